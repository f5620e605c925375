//! Builder methods shared by the option types ([`RunOptions`](crate::RunOptions),
//! [`SessionOptions`](crate::SessionOptions), [`ExecOptions`](crate::ExecOptions)): one
//! definition each, expanded into every type whose fields they set.

/// Expands the named groups of builder methods inside an option type's `impl` block.
macro_rules! builders {
    ($($group:ident),* $(,)?) => { $(builders!(@ $group);)* };
    (@ timeout) => {
        /// Sets the execution timeout.
        pub fn timeout_seconds(mut self, seconds: u64) -> Self {
            self.timeout_seconds = Some(seconds);
            self
        }
    };
    (@ memory) => {
        /// Sets the guest memory.
        pub fn memory_mb(mut self, mb: u32) -> Self {
            self.memory_mb = Some(mb);
            self
        }
    };
    (@ env) => {
        /// Adds one environment variable (an execution's own variable overrides a session's).
        pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
            self.env_vars.push((name.into(), value.into()));
            self
        }
    };
    (@ output) => {
        /// Streams stdout chunks to `f`.
        pub fn on_stdout(mut self, f: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
            self.on_stdout = Some(std::sync::Arc::new(f));
            self
        }

        /// Streams stderr chunks to `f`.
        pub fn on_stderr(mut self, f: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
            self.on_stderr = Some(std::sync::Arc::new(f));
            self
        }
    };
    (@ packages) => {
        /// Adds packages for the program to import (`name==version` for Python,
        /// `name@version` for JavaScript; ranges are resolved on the host). They are installed
        /// on the host and attached to the VM read-only: the guest needs no network for them.
        pub fn packages<S: Into<String>>(mut self, specs: impl IntoIterator<Item = S>) -> Self {
            self.packages.extend(specs.into_iter().map(Into::into));
            self
        }
    };
    (@ network) => {
        /// Lets the guest open connections, to every public destination unless
        /// [`allowed_domains`](Self::allowed_domains) narrows it.
        pub fn allow_network(mut self) -> Self {
            self.network = self.network.allow_network();
            self
        }

        /// Allows only these domains and their subdomains (an empty list allows nothing).
        /// Needs [`allow_network`](Self::allow_network).
        pub fn allowed_domains<S: Into<String>>(
            mut self,
            domains: impl IntoIterator<Item = S>,
        ) -> Self {
            self.network = self.network.allowed_domains(domains);
            self
        }

        /// Forwards a port from `127.0.0.1` on the host into the guest.
        pub fn expose(mut self, port: $crate::network::ExposePort) -> Self {
            self.network = self.network.expose(port);
            self
        }
    };
}
