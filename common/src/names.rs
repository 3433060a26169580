//! Rules for the names that reach URLs, file systems and SQL: model names, regions and
//! payload file paths.
//!
//! A name that breaks these rules is refused where it enters (a manifest, a CLI flag), so
//! the rest of the system can put it in a URL path or a file name without escaping.

use thiserror::Error;

/// Longest model or region name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest payload path inside a bundle, in bytes.
pub const MAX_PATH_LEN: usize = 255;

/// Why a name or path was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is empty or longer than allowed.
    #[error("{what} {name:?} must be 1 to {max} bytes long")]
    Length {
        /// What kind of name it is ("model name", "region").
        what: &'static str,
        /// The refused name.
        name: String,
        /// The longest length allowed.
        max: usize,
    },
    /// The name holds a character outside its alphabet, or starts with a separator.
    #[error(
        "{what} {name:?} may hold only lowercase ASCII letters, digits, '-', '_' and '.', and must start with a letter or digit"
    )]
    Alphabet {
        /// What kind of name it is.
        what: &'static str,
        /// The refused name.
        name: String,
    },
    /// A payload path that is absolute, climbs out with `..`, or has empty or odd parts.
    #[error(
        "payload path {0:?} is not a plain relative path (letters, digits, '-', '_', '.' in '/'-separated parts, no '..')"
    )]
    UnsafePath(String),
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
}

fn check_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(NameError::Length { what, name: name.to_owned(), max: MAX_NAME_LEN });
    }
    let bytes = name.as_bytes();
    if !bytes[0].is_ascii_alphanumeric() || !bytes.iter().all(|&c| is_name_char(c)) {
        return Err(NameError::Alphabet { what, name: name.to_owned() });
    }
    Ok(())
}

/// Checks a model (or feature view) name: `[a-z0-9][a-z0-9._-]*`, at most 64 bytes.
pub fn check_model_name(name: &str) -> Result<(), NameError> {
    check_name("model name", name)
}

/// Checks a region name, with the same alphabet as model names (`eu-west-1`).
pub fn check_region(region: &str) -> Result<(), NameError> {
    check_name("region", region)
}

/// Checks a payload path: relative, `/`-separated parts of `[A-Za-z0-9._-]`, no part
/// that is empty, `.` or `..`, at most 255 bytes. Such a path can be joined to a
/// directory without escaping it on any platform the agent runs on.
pub fn check_payload_path(path: &str) -> Result<(), NameError> {
    let unsafe_path = || NameError::UnsafePath(path.to_owned());
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Err(unsafe_path());
    }
    for part in path.split('/') {
        let plain =
            part.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
        if part.is_empty() || part == "." || part == ".." || !plain {
            return Err(unsafe_path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        for ok in ["sensor-fault", "a", "resnet50_v1.5", "0day"] {
            assert_eq!(check_model_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Sensor", "-x", ".x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(check_model_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn payload_paths() {
        for ok in ["model.onnx", "weights/part-1.bin", "A_b.C"] {
            assert_eq!(check_payload_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/",
            "a\\b",
            "..\\..\\x",
            "C:evil",
            "a\0b",
            "dir/..",
        ] {
            assert_eq!(
                check_payload_path(bad),
                Err(NameError::UnsafePath(bad.to_owned())),
                "{bad:?}"
            );
        }
    }
}
