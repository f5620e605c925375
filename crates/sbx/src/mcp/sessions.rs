//! The sandbox sessions an MCP server holds for its clients: at most `max` at once, each under
//! an unguessable id, all closed when the server stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use exec_sandbox::Session;

/// Why a session id did not lead to a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionsError {
    /// Every slot is taken.
    #[error(
        "this server already holds {max} sessions (its --max-sessions): close one with session_close first"
    )]
    Full {
        /// The limit.
        max: usize,
    },
    /// No open session has this id.
    #[error(
        "no open session `{id}`: it was closed (session_close, its idle timeout, exit code 137 or a lost VM) or never existed"
    )]
    Unknown {
        /// The id asked for.
        id: String,
    },
}

/// The open sessions, shared by every connection of one server.
#[derive(Clone)]
pub struct Sessions {
    max: usize,
    open: Arc<Mutex<HashMap<String, Arc<Session>>>>,
}

impl Sessions {
    /// A table of at most `max` sessions.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sessions the library closed by itself (idle timeout, 137, a lost VM) free their slot.
    fn forget_closed(open: &mut HashMap<String, Arc<Session>>) {
        open.retain(|_, s| s.close_reason().is_none());
    }

    /// Whether a new session would fit now (checked before a VM is started for it).
    pub fn has_room(&self) -> Result<(), SessionsError> {
        let mut open = self.lock();
        Self::forget_closed(&mut open);
        if open.len() >= self.max {
            return Err(SessionsError::Full { max: self.max });
        }
        Ok(())
    }

    /// Keeps `session` under a new id, or hands it back when the table filled up meanwhile.
    pub fn insert(&self, session: Session) -> Result<String, (Session, SessionsError)> {
        let mut open = self.lock();
        Self::forget_closed(&mut open);
        if open.len() >= self.max {
            return Err((session, SessionsError::Full { max: self.max }));
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        open.insert(id.clone(), Arc::new(session));
        Ok(id)
    }

    /// The open session `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Session>, SessionsError> {
        let mut open = self.lock();
        Self::forget_closed(&mut open);
        open.get(id)
            .cloned()
            .ok_or_else(|| SessionsError::Unknown { id: id.into() })
    }

    /// Takes session `id` out of the table.
    pub fn remove(&self, id: &str) -> Result<Arc<Session>, SessionsError> {
        self.lock()
            .remove(id)
            .ok_or_else(|| SessionsError::Unknown { id: id.into() })
    }

    /// Takes every session out of the table.
    pub fn drain(&self) -> Vec<Arc<Session>> {
        self.lock().drain().map(|(_, s)| s).collect()
    }
}
