//! Finding and reading a daemon's configuration file: the file given, else the packaged
//! default when it exists, else the built-in defaults. Parsing and range checks are the
//! core's ([`falaj_common::config`]); this is only the reading.

use std::path::{Path, PathBuf};

use falaj_common::config::{Checked, ConfigError, parse};

/// Reads and checks the file at `path`.
pub fn load<T: Checked>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(&text, path)
}

/// The configuration in `given`, else in `default_path` if that file exists, else `T`'s
/// defaults: a packaged daemon reads `/etc/falaj/...` and a developer's needs no file.
pub fn load_or_default<T: Checked + Default>(
    given: Option<&Path>,
    default_path: &Path,
) -> Result<T, ConfigError> {
    match given {
        Some(path) => load(path),
        None if default_path.exists() => load(default_path),
        None => Ok(T::default()),
    }
}

/// A command-line path made absolute against the current directory, as clap's
/// `value_parser`, so that a relative `--data-dir` names the same directory to every
/// command and to a daemon that later changes directory.
pub fn absolute_path(arg: &str) -> Result<PathBuf, String> {
    std::path::absolute(arg).map_err(|e| format!("{arg}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Toy {
        #[serde(default)]
        size: u32,
    }

    impl Checked for Toy {
        fn check(&self, path: &Path) -> Result<(), ConfigError> {
            falaj_common::config::within(path, "size", self.size, 0, 10)
        }
    }

    #[test]
    fn the_given_file_wins_then_the_default_file_then_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let given = dir.path().join("given.toml");
        let default = dir.path().join("default.toml");
        std::fs::write(&given, "size = 3\n").unwrap();

        let none: Toy = load_or_default(None, &default).unwrap();
        assert_eq!(none, Toy { size: 0 });
        std::fs::write(&default, "size = 5\n").unwrap();
        let packaged: Toy = load_or_default(None, &default).unwrap();
        assert_eq!(packaged, Toy { size: 5 });
        let chosen: Toy = load_or_default(Some(&given), &default).unwrap();
        assert_eq!(chosen, Toy { size: 3 });
    }

    #[test]
    fn a_missing_given_file_or_a_bad_value_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let err = load_or_default::<Toy>(Some(&missing), &missing).unwrap_err();
        assert!(matches!(&err, ConfigError::Read { path, .. } if *path == missing), "{err}");

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "size = 11\n").unwrap();
        let err = load::<Toy>(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("size"), "{err}");
    }

    #[test]
    fn a_relative_path_is_taken_from_the_current_directory() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(absolute_path("site/agent").unwrap(), cwd.join("site/agent"));
        assert_eq!(absolute_path("/var/lib/x").unwrap(), PathBuf::from("/var/lib/x"));
    }
}
