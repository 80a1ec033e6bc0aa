//! A one-item mailbox between a producer that must never wait and a
//! consumer that may be slow: a new item replaces the one still waiting.

use std::sync::{Condvar, Mutex};

/// Holds at most one item; `put` never blocks.
pub struct Mailbox<T> {
    slot: Mutex<(Option<T>, bool)>,
    ready: Condvar,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox {
            slot: Mutex::new((None, false)),
            ready: Condvar::new(),
        }
    }
}

impl<T> Mailbox<T> {
    /// Leaves `item` for the consumer. True when it replaced one the
    /// consumer had not taken yet; after `close`, the item is dropped.
    pub fn put(&self, item: T) -> bool {
        let mut s = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if s.1 {
            return false;
        }
        let replaced = s.0.replace(item).is_some();
        drop(s);
        self.ready.notify_one();
        replaced
    }

    /// The next item, waiting for one; `None` once closed and empty.
    pub fn take(&self) -> Option<T> {
        let mut s = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(item) = s.0.take() {
                return Some(item);
            }
            if s.1 {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// No more items will be put; the one waiting is still taken.
    pub fn close(&self) {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn newest_wins_and_close_drains() {
        let m = Mailbox::default();
        assert!(!m.put(1));
        assert!(m.put(2));
        assert_eq!(m.take(), Some(2));
        m.put(3);
        m.close();
        assert!(!m.put(4));
        assert_eq!(m.take(), Some(3));
        assert_eq!(m.take(), None);
    }

    #[test]
    fn a_waiting_consumer_wakes_on_put_and_on_close() {
        let m = Arc::new(Mailbox::default());
        let c = m.clone();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(v) = c.take() {
                got.push(v);
            }
            got
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        m.put(7);
        std::thread::sleep(std::time::Duration::from_millis(20));
        m.close();
        assert_eq!(t.join().unwrap(), vec![7]);
    }
}
