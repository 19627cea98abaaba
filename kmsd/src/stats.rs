//! Counters reported by `STATS`.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// The server's counters, each a running total since start.
        #[derive(Default)]
        pub struct Stats {
            $(
                #[doc = concat!("`", stringify!($name), "`")]
                pub $name: AtomicU64,
            )*
        }

        impl Stats {
            /// The counters as `name=value` pairs separated by spaces.
            pub fn render(&self, extra: &[(&str, u64)]) -> String {
                let mut out = Vec::new();
                $( out.push(format!("{}={}", stringify!($name), self.$name.load(Ordering::Relaxed))); )*
                out.extend(extra.iter().map(|(name, value)| format!("{name}={value}")));
                out.join(" ")
            }
        }
    };
}

counters!(
    requests,
    errors,
    denied,
    cache_hits,
    cache_misses,
    provider_get,
    provider_get_version,
    provider_create,
    provider_get_or_create,
    provider_rotate,
    provider_delete,
    provider_list,
    connections,
);

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
