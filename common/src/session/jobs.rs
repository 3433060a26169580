//! The fine-tune job queue's schedule. The queue itself lives in the agent's store; this
//! decides when to take the next job from it: one at a time, only after jobs left running
//! by a previous process have been marked failed, again whenever a document brings new
//! jobs or a job ends, connected or not.

/// Where the job runner stands.
#[derive(Debug, Clone, Default)]
pub struct Jobs {
    recovered: bool,
    running: Option<String>,
    /// The store may hold pending jobs.
    waiting: bool,
    /// The ids of the jobs the applied document orders: what reports cover.
    ordered: Vec<String>,
}

impl Jobs {
    /// Jobs interrupted by the last stop were marked failed: pending ones may start.
    pub fn recovered(&mut self) {
        self.recovered = true;
        self.waiting = true;
    }

    /// New jobs may be pending.
    pub fn wake(&mut self) {
        self.waiting = true;
    }

    /// Whether to take the next pending job now. Clears the wake-up.
    pub fn poll_start(&mut self) -> bool {
        if self.recovered && self.waiting && self.running.is_none() {
            self.waiting = false;
            return true;
        }
        false
    }

    /// The store answered: `Some(id)` started, `None` nothing pending.
    pub fn started(&mut self, id: Option<String>) {
        self.running = id;
    }

    /// The running job ended (its report is stored): look for the next.
    pub fn finished(&mut self, id: &str) {
        if self.running.as_deref() == Some(id) {
            self.running = None;
        }
        self.waiting = true;
    }

    /// The job running, if any.
    pub fn running(&self) -> Option<&str> {
        self.running.as_deref()
    }

    /// The applied document orders these jobs.
    pub fn set_ordered(&mut self, ids: Vec<String>) {
        self.ordered = ids;
    }

    /// The jobs reports cover.
    pub fn ordered(&self) -> &[String] {
        &self.ordered
    }
}
