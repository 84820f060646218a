//! The configuration a running server uses, replaceable while it runs (SIGHUP reload): new
//! sessions take the current one, sessions already established keep what they started with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::Config;

/// A shared, replaceable [`Config`]. Cloning shares it.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: RwLock<Arc<Config>>,
    /// Bumped by every [`LiveConfig::replace`], so that event loops can keep a copy and check
    /// one atomic per turn instead of taking the lock.
    generation: AtomicU64,
}

impl LiveConfig {
    /// Starts with `config`.
    pub fn new(config: Arc<Config>) -> Self {
        LiveConfig {
            inner: Arc::new(Inner {
                current: RwLock::new(config),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// The configuration new sessions use now.
    pub fn load(&self) -> Arc<Config> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `config` the one new sessions use.
    pub fn replace(&self, config: Arc<Config>) {
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = config;
        self.inner.generation.fetch_add(1, Ordering::Release);
    }

    /// How many times it was replaced.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// A copy for one event loop, refreshed with [`LoopConfig::refresh`].
    pub fn for_loop(&self) -> LoopConfig {
        let generation = self.generation();
        LoopConfig {
            live: self.clone(),
            generation,
            config: self.load(),
        }
    }
}

impl From<Arc<Config>> for LiveConfig {
    fn from(config: Arc<Config>) -> Self {
        LiveConfig::new(config)
    }
}

impl From<Config> for LiveConfig {
    fn from(config: Config) -> Self {
        LiveConfig::new(Arc::new(config))
    }
}

/// An event loop's copy of the live configuration.
#[derive(Debug)]
pub struct LoopConfig {
    live: LiveConfig,
    generation: u64,
    config: Arc<Config>,
}

impl LoopConfig {
    /// Takes the current configuration if it was replaced since the last call.
    pub fn refresh(&mut self) {
        let generation = self.live.generation();
        if generation != self.generation {
            self.generation = generation;
            self.config = self.live.load();
        }
    }

    /// The configuration as of the last refresh.
    pub fn get(&self) -> &Arc<Config> {
        &self.config
    }
}

impl std::ops::Deref for LoopConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_reaches_new_loads_and_refreshed_loops_only() {
        let live = LiveConfig::new(Arc::new(Config::default()));
        let mut in_loop = live.for_loop();
        let taken = live.load();
        live.replace(Arc::new(Config {
            max_sessions: Some(7),
            ..Config::default()
        }));
        assert_eq!(taken.max_sessions, None);
        assert_eq!(in_loop.max_sessions, None);
        in_loop.refresh();
        assert_eq!(in_loop.max_sessions, Some(7));
        assert_eq!(live.load().max_sessions, Some(7));
        assert_eq!(live.generation(), 1);
    }
}
