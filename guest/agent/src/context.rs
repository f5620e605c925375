//! State shared by every part of the serving agent.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::config::Config;
use crate::reaper::Reaper;

/// Configuration, the reaper, and the sessions of the live interpreters.
#[derive(Debug)]
pub struct Context {
    /// How the agent runs.
    pub config: Config,
    /// Owner of every child's exit status.
    pub reaper: Reaper,
    sessions: Mutex<HashSet<i32>>,
}

impl Context {
    /// A context for `config`.
    pub fn new(config: Config, reaper: Reaper) -> Self {
        Context {
            config,
            reaper,
            sessions: Mutex::default(),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a live interpreter's session (its pid: interpreters call `setsid`).
    pub fn add_session(&self, sid: i32) {
        self.sessions().insert(sid);
    }

    /// Forgets a session.
    pub fn remove_session(&self, sid: i32) {
        self.sessions().remove(&sid);
    }

    /// Sessions of the live interpreters other than `sid`, to spare in a sweep.
    pub fn other_sessions(&self, sid: i32) -> Vec<i32> {
        self.sessions()
            .iter()
            .copied()
            .filter(|s| *s != sid)
            .collect()
    }
}
