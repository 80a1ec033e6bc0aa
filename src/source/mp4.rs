//! A minimal MP4 (ISO BMFF) demuxer for one H.264 video track: enough to
//! feed a decoder its access units in order, with errors that name the box
//! or the sample that is missing.

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// One H.264 track of an MP4 file, memory-mapped.
pub struct Mp4H264 {
    path: PathBuf,
    data: memmap2::Mmap,
    /// Pixel size from the sample entry.
    pub width: usize,
    pub height: usize,
    /// Frames per second from the sample durations (0 when unknown).
    pub fps: f64,
    /// Bytes of each NAL length prefix (1, 2 or 4).
    length_size: usize,
    /// SPS and PPS NAL units from `avcC`.
    parameter_sets: Vec<Vec<u8>>,
    /// (file offset, size) of every sample, in decode order.
    samples: Vec<(u64, u32)>,
}

/// A box: its type and its payload's byte range in the file.
#[derive(Clone, Copy)]
struct BoxRef {
    kind: [u8; 4],
    start: usize,
    end: usize,
    /// The box's declared size runs past its parent (truncated file).
    clipped: bool,
}

/// An MP4 the in-process decoder cannot play (HEVC, B-frames, 10-bit or
/// 4:4:4 H.264): ffmpeg, when installed, decodes it instead.
#[derive(Debug)]
pub struct NeedsFfmpeg(pub String);

impl std::fmt::Display for NeedsFfmpeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NeedsFfmpeg {}

/// H.264 profiles openh264 does not decode: High 10, High 4:2:2, High 4:4:4.
const UNDECODED_PROFILES: &[(u8, &str)] = &[
    (110, "High 10 (10-bit)"),
    (122, "High 4:2:2"),
    (244, "High 4:4:4"),
    (44, "CAVLC 4:4:4"),
];

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes(s.try_into().unwrap()))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes(s.try_into().unwrap()))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes(s.try_into().unwrap()))
}

/// The boxes directly inside `data[start..end]`. A box running past the end
/// is kept, clipped, so a truncated file still exposes what it has.
fn children(data: &[u8], start: usize, end: usize) -> Vec<BoxRef> {
    let mut out = Vec::new();
    let mut at = start;
    while at + 8 <= end {
        let size32 = be32(data, at).unwrap_or(0) as u64;
        let mut kind = [0u8; 4];
        kind.copy_from_slice(&data[at + 4..at + 8]);
        let (header, size) = match size32 {
            0 => (8, (end - at) as u64),
            1 => match be64(data, at + 8) {
                Some(s) => (16, s),
                None => break,
            },
            s => (8, s),
        };
        if size < header as u64 {
            break;
        }
        let box_end = at.saturating_add(size as usize).min(end);
        out.push(BoxRef {
            kind,
            start: (at + header).min(box_end),
            end: box_end,
            clipped: (at as u64).saturating_add(size) > end as u64,
        });
        at = at.saturating_add(size as usize);
    }
    out
}

fn find(data: &[u8], parent: BoxRef, kind: &[u8; 4]) -> Option<BoxRef> {
    children(data, parent.start, parent.end)
        .into_iter()
        .find(|b| &b.kind == kind)
}

fn name(kind: &[u8; 4]) -> String {
    String::from_utf8_lossy(kind).into_owned()
}

impl Mp4H264 {
    /// Opens `path` and indexes its first H.264 video track.
    pub fn open(path: &Path) -> Result<Mp4H264> {
        let file =
            std::fs::File::open(path).with_context(|| format!("video {}", path.display()))?;
        // SAFETY: the file is opened read-only; a file truncated by someone
        // else while mapped is the usual mmap caveat, accepted for a player.
        let data = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("video {}: cannot map", path.display()))?;
        Self::index(path, data).with_context(|| format!("video {}", path.display()))
    }

    fn index(path: &Path, data: memmap2::Mmap) -> Result<Mp4H264> {
        let d: &[u8] = &data;
        let top = children(d, 0, d.len());
        ensure!(
            top.iter().any(|b| &b.kind == b"ftyp"),
            "not an MP4 file (no 'ftyp' box)"
        );
        let moov = top
            .iter()
            .find(|b| &b.kind == b"moov")
            .copied()
            .context("no 'moov' box (truncated, or still being written)")?;
        ensure!(
            !moov.clipped,
            "truncated: the 'moov' index is cut short (the file has {} bytes)",
            d.len()
        );
        for trak in children(d, moov.start, moov.end)
            .into_iter()
            .filter(|b| &b.kind == b"trak")
        {
            let Some(mdia) = find(d, trak, b"mdia") else {
                continue;
            };
            let handler = find(d, mdia, b"hdlr").and_then(|h| d.get(h.start + 8..h.start + 12));
            if handler != Some(b"vide") {
                continue;
            }
            let timescale = find(d, mdia, b"mdhd").and_then(|m| {
                let version = d.get(m.start)?;
                be32(d, m.start + if *version == 1 { 20 } else { 12 })
            });
            let stbl = find(d, mdia, b"minf")
                .and_then(|m| find(d, m, b"stbl"))
                .context("video track without 'stbl'")?;
            let stsd = find(d, stbl, b"stsd").context("no 'stsd' box")?;
            // stsd: version/flags, count, then sample entries.
            let entries = children(d, stsd.start + 8, stsd.end);
            let Some(avc1) = entries
                .iter()
                .find(|e| &e.kind == b"avc1" || &e.kind == b"avc3")
            else {
                let kinds: Vec<String> = entries.iter().map(|e| name(&e.kind)).collect();
                return Err(NeedsFfmpeg(format!(
                    "the video track is not H.264 (sample entries: {}), which the in-process decoder does not play",
                    kinds.join(", ")
                ))
                .into());
            };
            let width = be16(d, avc1.start + 24).context("short 'avc1' entry")? as usize;
            let height = be16(d, avc1.start + 26).context("short 'avc1' entry")? as usize;
            let avcc = children(d, avc1.start + 78, avc1.end)
                .into_iter()
                .find(|b| &b.kind == b"avcC")
                .context("no 'avcC' decoder configuration")?;
            let avcc_bytes = &d[avcc.start..avcc.end];
            let (length_size, parameter_sets) = parse_avcc(avcc_bytes)?;
            if let Some((_, name)) = UNDECODED_PROFILES
                .iter()
                .find(|(p, _)| avcc_bytes.get(1) == Some(p))
            {
                return Err(NeedsFfmpeg(format!(
                    "H.264 {name}, which the in-process decoder does not play"
                ))
                .into());
            }
            // Pictures decoded out of display order (B-frames, most
            // phones' and ffmpeg's defaults): the composition offsets say so.
            if let Some(ctts) = find(d, stbl, b"ctts") {
                let n = be32(d, ctts.start + 4).unwrap_or(0) as usize;
                let reordered = (0..n.min((ctts.end - ctts.start).saturating_sub(8) / 8))
                    .any(|i| be32(d, ctts.start + 12 + 8 * i).is_some_and(|o| o != 0));
                if reordered {
                    return Err(NeedsFfmpeg(
                        "it has B-frames (pictures stored out of display order), which the in-process decoder does not play"
                            .into(),
                    )
                    .into());
                }
            }
            let samples = sample_table(d, stbl)?;
            let fps = match (timescale, find(d, stbl, b"stts")) {
                (Some(ts), Some(stts)) if ts > 0 => {
                    let n = be32(d, stts.start + 4).unwrap_or(0) as usize;
                    let (mut count, mut ticks) = (0u64, 0u64);
                    for i in 0..n {
                        let (Some(c), Some(delta)) = (
                            be32(d, stts.start + 8 + 8 * i),
                            be32(d, stts.start + 12 + 8 * i),
                        ) else {
                            break;
                        };
                        count += c as u64;
                        ticks += c as u64 * delta as u64;
                    }
                    if ticks > 0 {
                        count as f64 * ts as f64 / ticks as f64
                    } else {
                        0.0
                    }
                }
                _ => 0.0,
            };
            return Ok(Mp4H264 {
                path: path.to_path_buf(),
                data,
                width,
                height,
                fps,
                length_size,
                parameter_sets,
                samples,
            });
        }
        bail!("no video track")
    }

    /// Number of samples (frames) in the track.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when the track has no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// SPS and PPS as one Annex-B buffer, for the decoder's first packet.
    pub fn parameter_sets_annexb(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for ps in &self.parameter_sets {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(ps);
        }
        out
    }

    /// Sample `i` rewritten from length-prefixed NAL units to Annex-B start
    /// codes into `out`. Fails if the file ends before the sample does.
    pub fn sample_annexb(&self, i: usize, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        let (offset, size) = self.samples[i];
        let end = offset.saturating_add(u64::from(size));
        ensure!(
            end <= self.data.len() as u64,
            "{}: truncated: frame {} lies at bytes {offset}..{end} but the file has {} bytes",
            self.path.display(),
            i + 1,
            self.data.len()
        );
        let mut s = &self.data[offset as usize..end as usize];
        while !s.is_empty() {
            ensure!(
                s.len() >= self.length_size,
                "{}: frame {}: cut NAL length",
                self.path.display(),
                i + 1
            );
            let n = s[..self.length_size]
                .iter()
                .fold(0usize, |a, &b| (a << 8) | b as usize);
            s = &s[self.length_size..];
            ensure!(
                n <= s.len(),
                "{}: frame {}: NAL unit of {n} bytes overruns the sample",
                self.path.display(),
                i + 1
            );
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(&s[..n]);
            s = &s[n..];
        }
        Ok(())
    }
}

/// NAL length size and the parameter sets of an `avcC` record.
fn parse_avcc(b: &[u8]) -> Result<(usize, Vec<Vec<u8>>)> {
    ensure!(b.len() >= 7 && b[0] == 1, "bad 'avcC' record");
    let length_size = (b[4] & 3) as usize + 1;
    let mut sets = Vec::new();
    let mut at = 5;
    for pass in 0..2 {
        let count = if pass == 0 {
            (b[at] & 0x1f) as usize
        } else {
            *b.get(at).context("bad 'avcC' record")? as usize
        };
        at += 1;
        for _ in 0..count {
            let n = be16(b, at).context("bad 'avcC' record")? as usize;
            let ps = b.get(at + 2..at + 2 + n).context("bad 'avcC' record")?;
            sets.push(ps.to_vec());
            at += 2 + n;
        }
    }
    Ok((length_size, sets))
}

/// (offset, size) of every sample from `stsz`, `stsc` and `stco`/`co64`.
fn sample_table(d: &[u8], stbl: BoxRef) -> Result<Vec<(u64, u32)>> {
    let stsz = find(d, stbl, b"stsz").context("no 'stsz' box")?;
    let fixed = be32(d, stsz.start + 4).context("short 'stsz'")?;
    let count = be32(d, stsz.start + 8).context("short 'stsz'")? as usize;
    // Every sample holds at least one byte of the file (a fixed size: that
    // many), so a count the file cannot hold is refused before anything is
    // sized from it.
    let least = (fixed as usize).max(1);
    ensure!(
        count <= d.len() / least,
        "'stsz' lists {count} samples of {least}+ bytes, more than the file's {} bytes hold",
        d.len()
    );
    let sizes: Vec<u32> = (0..count)
        .map(|i| {
            if fixed != 0 {
                Some(fixed)
            } else {
                be32(d, stsz.start + 12 + 4 * i)
            }
        })
        .collect::<Option<_>>()
        .context("short 'stsz'")?;
    let chunks: Vec<u64> = if let Some(stco) = find(d, stbl, b"stco") {
        let n = be32(d, stco.start + 4).context("short 'stco'")? as usize;
        (0..n)
            .map(|i| be32(d, stco.start + 8 + 4 * i).map(u64::from))
            .collect::<Option<_>>()
            .context("short 'stco'")?
    } else {
        let co64 = find(d, stbl, b"co64").context("no 'stco' or 'co64' box")?;
        let n = be32(d, co64.start + 4).context("short 'co64'")? as usize;
        (0..n)
            .map(|i| be64(d, co64.start + 8 + 8 * i))
            .collect::<Option<_>>()
            .context("short 'co64'")?
    };
    let stsc = find(d, stbl, b"stsc").context("no 'stsc' box")?;
    let runs = be32(d, stsc.start + 4).context("short 'stsc'")? as usize;
    let runs: Vec<(usize, usize)> = (0..runs)
        .map(|i| {
            Some((
                be32(d, stsc.start + 8 + 12 * i)? as usize,
                be32(d, stsc.start + 12 + 12 * i)? as usize,
            ))
        })
        .collect::<Option<_>>()
        .context("short 'stsc'")?;
    let mut out = Vec::with_capacity(count);
    for (ci, &chunk_offset) in chunks.iter().enumerate() {
        // The run whose first chunk (1-based) is the last one at or before this chunk.
        let per_chunk = runs
            .iter()
            .rev()
            .find(|(first, _)| *first <= ci + 1)
            .map_or(0, |r| r.1);
        let mut at = chunk_offset;
        for _ in 0..per_chunk {
            let Some(&size) = sizes.get(out.len()) else {
                break;
            };
            // Offsets come from the file and may be garbage: they must not
            // wrap. (A sample past the end is a truncated file, reported when
            // that frame is reached, after the frames before it played.)
            let Some(end) = at.checked_add(u64::from(size)) else {
                bail!(
                    "sample {} at byte {at} with {size} bytes: offsets overflow",
                    out.len() + 1
                );
            };
            out.push((at, size));
            at = end;
        }
    }
    ensure!(
        out.len() == count,
        "sample table lists {count} samples but chunks hold {}",
        out.len()
    );
    Ok(out)
}
