//! Rendering an error and its causes for people, in one line.

use std::error::Error;

/// The error's message followed by each cause's, skipping a cause whose message the line
/// already contains (error types here often quote their cause in their own message).
pub fn describe(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("binding 127.0.0.1:1: {source}")]
    struct Bind {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("starting")]
    struct Start(#[source] Bind);

    #[test]
    fn quoted_causes_appear_once() {
        let err = Start(Bind { source: std::io::Error::other("address in use") });
        assert_eq!(describe(&err), "starting: binding 127.0.0.1:1: address in use");
    }
}
