//! What both daemons' configuration files share: one error type that names the file and
//! the key, TOML parsing with unknown keys refused, and range checks. Reading the file is
//! the shells' part; here the text comes in with the path it was read from, as a label.

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use thiserror::Error;

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML of the expected shape (an unknown key, a wrong type).
    #[error("configuration {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with the key and line.
        message: String,
    },
    /// A value is out of range.
    #[error("configuration {path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, dotted (`http.max_body_bytes`).
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// A configuration whose values can be checked once parsed.
pub trait Checked: DeserializeOwned {
    /// Checks every value, naming the key of the first that is wrong.
    fn check(&self, path: &Path) -> Result<(), ConfigError>;
}

/// Parses and checks `text`, read from `path`.
pub fn parse<T: Checked>(text: &str, path: &Path) -> Result<T, ConfigError> {
    let config: T = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim().to_owned(),
    })?;
    config.check(path)?;
    Ok(config)
}

/// Refuses `value` of `key` outside `low..=high`.
pub fn within<T: PartialOrd + Copy + Debug>(
    path: &Path,
    key: &'static str,
    value: T,
    low: T,
    high: T,
) -> Result<(), ConfigError> {
    if value < low || value > high {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message: format!("must be between {low:?} and {high:?}, got {value:?}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Limits {
        most: u32,
    }

    impl Checked for Limits {
        fn check(&self, path: &Path) -> Result<(), ConfigError> {
            within(path, "most", self.most, 1, 10)
        }
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let path = Path::new("/etc/x.toml");
        assert_eq!(parse::<Limits>("most = 3", path).unwrap().most, 3);
        let err = parse::<Limits>("most = 30", path).unwrap_err().to_string();
        assert_eq!(err, "configuration /etc/x.toml: most: must be between 1 and 10, got 30");
        let err = parse::<Limits>("mots = 3", path).unwrap_err().to_string();
        assert!(err.starts_with("configuration /etc/x.toml: ") && err.contains("mots"), "{err}");
    }
}
