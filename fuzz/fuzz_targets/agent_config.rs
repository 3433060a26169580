//! Any text as the agent's configuration file.
//!
//! The body, `falaj_agent::fuzzing::agent_config`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_agent::fuzzing::agent_config(data);
});
