#!/usr/bin/env bash
# Fetches the Debian packages whose photos, clips and cut-outs the training
# and the fallback calibration read (ersm_training/data.py lists them with
# their licences), and extracts each under DIR/<package>.
#   ./fetch_data.sh /tmp/ersm-data
set -euo pipefail
dir=${1:?usage: fetch_data.sh DIR}
mkdir -p "$dir/debs"
cd "$dir/debs"
apt-get download opencv-doc plasma-workspace-wallpapers mate-backgrounds gnome-backgrounds \
  ukui-wallpapers lomiri-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 \
  tuxpaint-stamps-default
for f in *.deb; do
  dpkg-deb -x "$f" "$dir/${f%%_*}"
  echo "$dir/${f%%_*}"
done
