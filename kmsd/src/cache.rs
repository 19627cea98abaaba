//! The cache of unwrapped keys: bounded in count, idle entries dropped, one provider call per
//! key however many callers miss at once.
//!
//! Keys are split over shards by id to keep lock hold times short. Each shard evicts in
//! insertion order when full (FIFO), and a sweeper drops entries idle longer than the idle
//! time. Evicted keys are zeroized as they drop ([`kms_core::SecretBytes`] does it).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kms_core::{Key, KeyId, Result};

const SHARDS: usize = 16;

struct Entry {
    key: Key,
    last_used: Instant,
}

#[derive(Default)]
struct Shard {
    map: HashMap<KeyId, Entry>,
    order: VecDeque<KeyId>,
}

/// A call in progress for one key id, that later callers wait for.
#[derive(Default)]
struct Flight {
    done: Mutex<Option<Result<Key>>>,
    ready: Condvar,
}

/// The cache.
pub struct KeyCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    idle: Duration,
    hasher: RandomState,
    flights: Mutex<HashMap<KeyId, Arc<Flight>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KeyCache {
    /// A cache of at most `capacity` keys, each dropped after `idle` without use.
    pub fn new(capacity: usize, idle: Duration) -> KeyCache {
        KeyCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            idle,
            hasher: RandomState::new(),
            flights: Mutex::new(HashMap::new()),
        }
    }

    fn shard(&self, id: &KeyId) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(id) as usize) % SHARDS]
    }

    /// The cached key, if fresh.
    pub fn get(&self, id: &KeyId) -> Option<Key> {
        let mut shard = lock(self.shard(id));
        let entry = shard.map.get_mut(id)?;
        let now = Instant::now();
        if now.duration_since(entry.last_used) > self.idle {
            shard.map.remove(id);
            return None;
        }
        entry.last_used = now;
        Some(entry.key.clone())
    }

    /// Caches `key` under its id, replacing an older entry.
    pub fn put(&self, key: &Key) {
        let mut shard = lock(self.shard(key.id()));
        let entry = Entry {
            key: key.clone(),
            last_used: Instant::now(),
        };
        if shard.map.insert(key.id().clone(), entry).is_none() {
            shard.order.push_back(key.id().clone());
        }
        while shard.map.len() > self.per_shard {
            match shard.order.pop_front() {
                Some(oldest) => {
                    shard.map.remove(&oldest);
                }
                None => break,
            }
        }
        // Ids of entries dropped by the sweeper linger in `order`; keep it bounded.
        if shard.order.len() > 2 * self.per_shard + 16 {
            let Shard { map, order } = &mut *shard;
            order.retain(|id| map.contains_key(id));
        }
    }

    /// Forgets `id`.
    pub fn remove(&self, id: &KeyId) {
        lock(self.shard(id)).map.remove(id);
    }

    /// Drops entries idle longer than the idle time; the number dropped.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut dropped = 0;
        for shard in &self.shards {
            let mut shard = lock(shard);
            let before = shard.map.len();
            shard
                .map
                .retain(|_, e| now.duration_since(e.last_used) <= self.idle);
            dropped += before - shard.map.len();
        }
        dropped
    }

    /// Whether no key is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of cached keys.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// Runs `call` for `id` unless the key is cached or a call for the same id is in progress,
    /// in which case its result is shared. A key result is cached. Returns the result and
    /// whether this caller led the flight.
    pub fn single_flight(
        &self,
        id: &KeyId,
        call: impl FnOnce() -> Result<Key>,
    ) -> (Result<Key>, bool) {
        let (flight, leader) = {
            let mut flights = lock(&self.flights);
            match flights.get(id) {
                Some(flight) => (Arc::clone(flight), false),
                None => {
                    let flight = Arc::new(Flight::default());
                    flights.insert(id.clone(), Arc::clone(&flight));
                    (flight, true)
                }
            }
        };
        if leader {
            // A call that finished between the caller's miss and now has cached the key.
            let result = match self.get(id) {
                Some(key) => Ok(key),
                None => call(),
            };
            if let Ok(key) = &result {
                self.put(key);
            }
            *lock(&flight.done) = Some(result.clone());
            flight.ready.notify_all();
            lock(&self.flights).remove(id);
            return (result, true);
        }
        let mut done = lock(&flight.done);
        while done.is_none() {
            done = flight.ready.wait(done).unwrap_or_else(|p| p.into_inner());
        }
        (done.clone().expect("checked above"), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_core::SecretBytes;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(id: &str, byte: u8) -> Key {
        Key::new(
            KeyId::new(id).unwrap(),
            1,
            SecretBytes::copy_from(&[byte; 32]),
        )
        .unwrap()
    }

    #[test]
    fn bounded_and_fifo() {
        let cache = KeyCache::new(SHARDS, Duration::from_secs(60));
        for i in 0..1000 {
            cache.put(&key(&format!("k{i}"), 1));
        }
        assert!(cache.len() <= SHARDS, "{}", cache.len());
        assert!(cache.get(&KeyId::new("k999").unwrap()).is_some());
    }

    #[test]
    fn idle_entries_expire() {
        let cache = KeyCache::new(100, Duration::from_millis(1));
        cache.put(&key("a", 1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(cache.get(&KeyId::new("a").unwrap()).is_none());
        cache.put(&key("b", 1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(cache.sweep(), 1);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn one_call_for_many_callers() {
        let cache = KeyCache::new(100, Duration::from_secs(60));
        let calls = AtomicUsize::new(0);
        let id = KeyId::new("shared").unwrap();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let (result, _) = cache.single_flight(&id, || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                        Ok(key("shared", 9))
                    });
                    assert_eq!(result.unwrap().expose_secret(), &[9; 32]);
                });
            }
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
