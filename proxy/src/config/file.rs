//! `--config FILE`: a TOML file whose keys are the command line's long flags, with the same
//! names and meanings (`listen = "0.0.0.0:1080"`, `deny-dest = ["10.0.0.0/8"]`). It is turned
//! into the flags it stands for, so the file and the command line cannot drift apart: one
//! parser, one set of checks.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a config file was refused. Each names the file and, where there is one, the key.
#[derive(Debug, Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {} is not valid TOML: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key that is not one of the server's flags.
    #[error("config file {}: unknown key '{key}'{hint}", path.display())]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// A suggestion, or empty.
        hint: String,
    },
    /// A value of the wrong kind, or one the flag's own parser refuses.
    #[error("config file {}: key '{key}': {message}", path.display())]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Flags that make no sense in a file: the file itself, and internal ones.
const NOT_IN_FILE: &[&str] = &["config", "help", "version"];

/// Reads `path` and returns the flags it stands for (`--key=value`, one per list element,
/// `--key` for `true`), leaving out the keys for which `on_command_line` is true (the command
/// line wins over the file). Each key's value is checked by `command`'s own parser.
pub fn flags_from_file(
    path: &Path,
    command: &clap::Command,
    on_command_line: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    flags_from_str(&text, path, command, on_command_line)
}

/// [`flags_from_file`] on text already read; `path` names it in errors.
pub fn flags_from_str(
    text: &str,
    path: &Path,
    command: &clap::Command,
    on_command_line: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigFileError> {
    let table: toml::Table =
        text.parse()
            .map_err(|err: toml::de::Error| ConfigFileError::Syntax {
                path: path.to_owned(),
                message: err.to_string().trim().replace('\n', " "),
            })?;
    let bad = |key: &str, message: String| ConfigFileError::BadValue {
        path: path.to_owned(),
        key: key.to_owned(),
        message,
    };
    let mut flags = Vec::new();
    for (key, value) in &table {
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(key.as_str()))
            .filter(|arg| !arg.is_hide_set() && !NOT_IN_FILE.contains(&key.as_str()))
            .ok_or_else(|| ConfigFileError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
                hint: suggestion(key, command),
            })?;
        if on_command_line(arg.get_id().as_str()) {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
        let mut these = Vec::new();
        match value {
            toml::Value::Boolean(on) if !takes_value => {
                if *on {
                    these.push(OsString::from(format!("--{key}")));
                }
            }
            toml::Value::Boolean(_) => {
                return Err(bad(key, "expects a value, not true/false".into()));
            }
            _ if !takes_value => {
                return Err(bad(key, "is a switch: write true or false".into()));
            }
            toml::Value::Array(items) if repeatable => {
                for item in items {
                    these.push(flag(key, item).map_err(|m| bad(key, m))?);
                }
            }
            toml::Value::Array(_) => {
                return Err(bad(key, "takes one value, not a list".into()));
            }
            scalar => these.push(flag(key, scalar).map_err(|m| bad(key, m))?),
        }
        // Each key on its own through the flag's parser, so an error names the key.
        let mut alone = vec![OsString::from(command.get_name())];
        alone.extend(these.iter().cloned());
        if let Err(err) = command.clone().try_get_matches_from(alone) {
            return Err(bad(key, clap_message(&err)));
        }
        flags.extend(these);
    }
    Ok(flags)
}

/// One `--key=value` from a scalar TOML value.
fn flag(key: &str, value: &toml::Value) -> Result<OsString, String> {
    let text = match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(_) => return Err("a list of switches makes no sense".into()),
        toml::Value::Array(_) => return Err("lists cannot be nested".into()),
        toml::Value::Table(_) => return Err("expects a value, not a table".into()),
        toml::Value::Datetime(_) => return Err("expects a value, not a date".into()),
    };
    Ok(OsString::from(format!("--{key}={text}")))
}

/// clap's message without its "error: " prefix and usage lines.
fn clap_message(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").trim().to_owned()
}

/// " (did you mean 'x'?)" when a flag's name is close to `key`.
fn suggestion(key: &str, command: &clap::Command) -> String {
    let normalized = key.replace('_', "-").to_ascii_lowercase();
    command
        .get_arguments()
        .filter(|arg| !arg.is_hide_set())
        .filter_map(|arg| arg.get_long())
        .find(|long| *long == normalized || long.trim_end_matches('s') == normalized)
        .map(|long| format!(" (did you mean '{long}'?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn command() -> Command {
        Command::new("proxy")
            .arg(Arg::new("listen").long("listen"))
            .arg(
                Arg::new("threads")
                    .long("threads")
                    .value_parser(clap::value_parser!(u16).range(1..=64)),
            )
            .arg(
                Arg::new("deny_dests")
                    .long("deny-dest")
                    .action(ArgAction::Append),
            )
            .arg(Arg::new("quiet").long("quiet").action(ArgAction::SetTrue))
            .arg(Arg::new("config").long("config"))
            .arg(
                Arg::new("internal")
                    .long("internal")
                    .hide(true)
                    .action(ArgAction::SetTrue),
            )
    }

    fn flags(text: &str) -> Result<Vec<String>, String> {
        flags_from_str(text, Path::new("p.toml"), &command(), |_| false)
            .map(|f| {
                f.into_iter()
                    .map(|s| s.into_string().expect("utf8"))
                    .collect()
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn keys_become_the_flags_they_name() {
        let got = flags(
            "listen = \"0.0.0.0:1080\"\nthreads = 4\ndeny-dest = [\"10.0.0.0/8\", \"::1\"]\nquiet = true\n",
        )
        .expect("parses");
        assert_eq!(
            got,
            [
                "--deny-dest=10.0.0.0/8",
                "--deny-dest=::1",
                "--listen=0.0.0.0:1080",
                "--quiet",
                "--threads=4"
            ]
        );
        assert_eq!(
            flags("quiet = false").expect("parses"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_command_line_wins() {
        let got = flags_from_str(
            "listen = \"0.0.0.0:1\"\nthreads = 2",
            Path::new("p.toml"),
            &command(),
            |id| id == "listen",
        )
        .expect("parses");
        assert_eq!(got, [OsString::from("--threads=2")]);
    }

    #[test]
    fn bad_files_are_refused_naming_the_key() {
        let cases = [
            ("listn = \"x\"", "unknown key 'listn'"),
            ("deny_dest = [\"x\"]", "did you mean 'deny-dest'?"),
            ("internal = true", "unknown key 'internal'"),
            ("config = \"other.toml\"", "unknown key 'config'"),
            ("threads = 0", "key 'threads'"),
            ("threads = \"many\"", "key 'threads'"),
            ("threads = [1, 2]", "takes one value, not a list"),
            ("quiet = \"yes\"", "is a switch"),
            ("listen = true", "expects a value"),
            ("listen = { a = 1 }", "not a table"),
            ("listen = ", "not valid TOML"),
        ];
        for (text, expected) in cases {
            let err = flags(text).expect_err(text);
            assert!(err.contains(expected), "{text}: {err}");
            assert!(err.contains("p.toml"), "{text}: {err}");
        }
    }
}
