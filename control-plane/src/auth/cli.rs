//! The commands of people and credentials: `falaj-control user add|list|set-role|disable|
//! enable|remove|reset-password`, `login`, `logout`, `whoami` and `apitoken
//! create|list|revoke`; and the session file `login` writes (`$XDG_CONFIG_HOME/falaj/session`,
//! else `~/.config/falaj/session`, mode 0600 in a 0700 directory), which other commands
//! use when it names the control plane they call.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};

use super::rules::Role;
use crate::cli::{ApiArgs, Failure, online};
use crate::client::AdminClient;

/// `user` subcommands (admins only).
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user; prints a one-time password unless `--password-stdin` gives one.
    Add(UserAddArgs),
    /// List users: role, status, sessions.
    List(ApiArgs),
    /// Change a user's role (its sessions carry the new one from their next request).
    SetRole(SetRoleArgs),
    /// Disable a user: its sessions end and it cannot log in.
    Disable(UserNameArgs),
    /// Enable a disabled user.
    Enable(UserNameArgs),
    /// Remove a user, its sessions and the API tokens it created.
    Remove(UserNameArgs),
    /// Set a new password (one-time, printed, unless `--password-stdin`); sessions end.
    ResetPassword(ResetPasswordArgs),
}

/// Arguments of `user add`.
#[derive(Debug, Args)]
pub struct UserAddArgs {
    /// The user's name (lowercase letters, digits, '-', '_', '.').
    name: String,
    /// admin, operator, viewer or auditor.
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    password_stdin: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `user set-role`.
#[derive(Debug, Args)]
pub struct SetRoleArgs {
    name: String,
    /// admin, operator, viewer or auditor.
    #[arg(value_parser = parse_role)]
    role: Role,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments naming one user.
#[derive(Debug, Args)]
pub struct UserNameArgs {
    name: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `user reset-password`.
#[derive(Debug, Args)]
pub struct ResetPasswordArgs {
    name: String,
    /// Read the new password from the first line of standard input.
    #[arg(long)]
    password_stdin: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The admin API's URL.
    #[arg(long, env = "FALAJ_CONTROL_PLANE", default_value = "http://127.0.0.1:7080")]
    control_plane: String,
    #[arg(long)]
    user: String,
    /// Read the password from the first line of standard input instead of a prompt.
    #[arg(long)]
    password_stdin: bool,
}

/// `apitoken` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApiTokenCommand {
    /// Create an API token for automation (printed once; never above your own role).
    Create(ApiTokenCreateArgs),
    /// List API tokens (never their secrets).
    List(ApiArgs),
    /// Revoke an API token (yours, or any as an admin).
    Revoke(ApiTokenRevokeArgs),
}

/// Arguments of `apitoken create`.
#[derive(Debug, Args)]
pub struct ApiTokenCreateArgs {
    /// The token's name (lowercase letters, digits, '-', '_', '.').
    #[arg(long)]
    name: String,
    /// admin, operator, viewer or auditor.
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// How long it is valid (1min to 366days).
    #[arg(long, default_value = "30days", value_parser = humantime::parse_duration)]
    ttl: Duration,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `apitoken revoke`.
#[derive(Debug, Args)]
pub struct ApiTokenRevokeArgs {
    /// The token's name.
    name: String,
    #[command(flatten)]
    api: ApiArgs,
}

fn parse_role(text: &str) -> Result<Role, String> {
    text.parse().map_err(|e: super::rules::UnknownRole| e.to_string())
}

fn io_failure(what: &str, e: &std::io::Error) -> Failure {
    Failure::other(anyhow::anyhow!("{what}: {e}"))
}

/// The first line of standard input, without its line ending.
fn read_stdin_line() -> Result<String, Failure> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| io_failure("reading the password from standard input", &e))?;
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    if line.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!("no password on standard input")));
    }
    Ok(line)
}

/// A password from standard input (`from_stdin`) or typed at a prompt without echo.
fn read_password(prompt: &str, from_stdin: bool) -> Result<String, Failure> {
    if from_stdin {
        return read_stdin_line();
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::usage(anyhow::anyhow!(
            "no terminal to prompt for the password on: pass --password-stdin"
        )));
    }
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    // Terminal echo off while the password is typed; `stty` acts on the terminal that is
    // its standard input, which it inherits.
    let stty =
        |arg: &str| std::process::Command::new("stty").arg(arg).status().is_ok_and(|s| s.success());
    let silenced = stty("-echo");
    let line = read_stdin_line();
    if silenced {
        stty("echo");
        eprintln!();
    }
    line
}

/// Runs a `user` command.
pub fn run_user(command: UserCommand) -> Result<(), Failure> {
    match command {
        UserCommand::Add(args) => {
            let password =
                args.password_stdin.then(|| read_password("password: ", true)).transpose()?;
            online(&args.api, |c| async move {
                let added = c.add_user(&args.name, args.role, password.as_deref()).await?;
                eprintln!("added user {} with role {}", args.name, args.role);
                if let Some(p) = added.password {
                    eprintln!("one-time password (shown once; the user may log in with it):");
                    println!("{p}");
                }
                Ok(())
            })
        }
        UserCommand::List(api) => online(&api, |c| async move {
            println!(
                "{:<24} {:<9} {:<9} {:>8} {:<22}",
                "NAME", "ROLE", "STATUS", "SESSIONS", "ADDED"
            );
            for u in c.users().await? {
                println!(
                    "{:<24} {:<9} {:<9} {:>8} {:<22}",
                    u.name,
                    u.role,
                    if u.disabled_at.is_some() { "disabled" } else { "enabled" },
                    u.sessions,
                    u.created_at.to_string()
                );
            }
            Ok(())
        }),
        UserCommand::SetRole(args) => online(&args.api, |c| async move {
            let changed = c.set_role(&args.name, args.role).await?;
            println!("user {} now has role {} (was {})", args.name, args.role, changed.previous);
            Ok(())
        }),
        UserCommand::Disable(args) => online(&args.api, |c| async move {
            c.set_disabled(&args.name, true).await?;
            println!("user {} disabled; its sessions have ended", args.name);
            Ok(())
        }),
        UserCommand::Enable(args) => online(&args.api, |c| async move {
            c.set_disabled(&args.name, false).await?;
            println!("user {} enabled", args.name);
            Ok(())
        }),
        UserCommand::Remove(args) => online(&args.api, |c| async move {
            c.remove_user(&args.name).await?;
            println!("user {} removed, with its sessions and the API tokens it created", args.name);
            Ok(())
        }),
        UserCommand::ResetPassword(args) => {
            let password =
                args.password_stdin.then(|| read_password("new password: ", true)).transpose()?;
            online(&args.api, |c| async move {
                let reset = c.reset_password(&args.name, password.as_deref()).await?;
                eprintln!("password of {} reset; its sessions have ended", args.name);
                if let Some(p) = reset.password {
                    eprintln!("one-time password (shown once):");
                    println!("{p}");
                }
                Ok(())
            })
        }
    }
}

/// Runs an `apitoken` command.
pub fn run_api_token(command: ApiTokenCommand) -> Result<(), Failure> {
    match command {
        ApiTokenCommand::Create(args) => online(&args.api, |c| async move {
            let created = c.create_api_token(&args.name, args.role, args.ttl).await?;
            eprintln!(
                "API token {} with role {}, valid until {} (shown once; pass it as --token or FALAJ_TOKEN):",
                args.name, args.role, created.expires_at
            );
            println!("{}", created.token);
            Ok(())
        }),
        ApiTokenCommand::List(api) => online(&api, |c| async move {
            println!(
                "{:<24} {:<9} {:<24} {:<22} {:<22} STATUS",
                "NAME", "ROLE", "CREATED BY", "EXPIRES", "LAST USED"
            );
            let now = Timestamp::from_system(std::time::SystemTime::now());
            for t in c.api_tokens().await? {
                let status = match t.revoked_at {
                    Some(_) => "revoked",
                    None if t.expires_at <= now => "expired",
                    None => "live",
                };
                println!(
                    "{:<24} {:<9} {:<24} {:<22} {:<22} {status}",
                    t.name,
                    t.role,
                    t.created_by,
                    t.expires_at.to_string(),
                    t.last_used.map_or_else(|| "never".to_owned(), |t| t.to_string()),
                );
            }
            Ok(())
        }),
        ApiTokenCommand::Revoke(args) => online(&args.api, |c| async move {
            c.revoke_api_token(&args.name).await?;
            println!("API token {} revoked", args.name);
            Ok(())
        }),
    }
}

/// `whoami`.
pub fn run_whoami(api: &ApiArgs) -> Result<(), Failure> {
    online(api, |c| async move {
        let me = c.whoami().await?;
        println!("{} ({}) at {}", me.actor, me.role, c.base());
        println!("permissions: {}", me.permissions.join(", "));
        Ok(())
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::other(anyhow::anyhow!("starting the async runtime: {e}")))
}

/// `login`: asks for the password, opens a session and stores it.
pub fn run_login(args: &LoginArgs) -> Result<(), Failure> {
    let path = session_path().ok_or_else(|| {
        Failure::config(anyhow::anyhow!("neither XDG_CONFIG_HOME nor HOME is set"))
    })?;
    let password = read_password(&format!("password for {}: ", args.user), args.password_stdin)?;
    let client = AdminClient::new(&args.control_plane, "");
    let view = runtime()?.block_on(client.login(&args.user, &password)).map_err(Failure::other)?;
    let stored = StoredSession {
        control_plane: client.base().to_owned(),
        user: view.user.clone(),
        token: view.token,
        expires_at: view.expires_at,
    };
    save_session(&path, &stored)
        .map_err(|e| io_failure(&format!("writing {}", path.display()), &e))?;
    println!(
        "logged in to {} as {} ({}); the session ends after {} unused, or at {}",
        stored.control_plane,
        view.user,
        view.role,
        humantime::format_duration(Duration::from_secs(view.idle_seconds)),
        view.expires_at
    );
    println!("session stored in {}", path.display());
    Ok(())
}

/// `logout`: ends the stored session on its control plane and forgets it.
pub fn run_logout() -> Result<(), Failure> {
    let path = session_path().ok_or_else(|| {
        Failure::config(anyhow::anyhow!("neither XDG_CONFIG_HOME nor HOME is set"))
    })?;
    let Some(stored) = load_session(&path)? else {
        println!("not logged in ({} does not exist)", path.display());
        return Ok(());
    };
    let client = AdminClient::new(&stored.control_plane, &stored.token);
    let ended = runtime()?.block_on(client.logout());
    std::fs::remove_file(&path)
        .map_err(|e| io_failure(&format!("removing {}", path.display()), &e))?;
    match ended {
        Ok(_) => println!("logged out of {} ({})", stored.control_plane, stored.user),
        // Forgotten here either way; an expired session has ended there already.
        Err(e) => eprintln!(
            "forgot the session; the control plane did not end it: {}",
            falaj_common::errors::describe(&e)
        ),
    }
    Ok(())
}

/// A session as `login` stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSession {
    /// The admin API it is for.
    pub control_plane: String,
    pub user: String,
    /// The bearer token.
    pub token: String,
    /// When it ends at the latest.
    pub expires_at: Timestamp,
}

/// Where `login` stores the session: `$XDG_CONFIG_HOME/falaj/session`, else
/// `$HOME/.config/falaj/session`.
pub fn session_path() -> Option<PathBuf> {
    let nonempty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .and_then(nonempty)
        .or_else(|| std::env::var_os("HOME").and_then(nonempty).map(|h| h.join(".config")))?;
    Some(config.join("falaj").join("session"))
}

/// The stored session at `path`, if there is one.
pub fn load_session(path: &Path) -> Result<Option<StoredSession>, Failure> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_failure(&format!("reading {}", path.display()), &e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        Failure::config(anyhow::anyhow!("{}: {e} (remove it, or log in again)", path.display()))
    })
}

/// Writes the session at `path` (mode 0600), its directory made private (0700).
pub fn save_session(path: &Path, session: &StoredSession) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::files::create_private_dir(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let json = serde_json::to_vec_pretty(session).map_err(std::io::Error::other)?;
    crate::files::write_atomic(path, &json, 0o600)
}

/// The stored session's token, if one is stored for `control_plane`.
pub(crate) fn session_token_for(control_plane: &str) -> Result<Option<String>, Failure> {
    let Some(path) = session_path() else { return Ok(None) };
    let wanted = control_plane.trim_end_matches('/');
    Ok(load_session(&path)?
        .filter(|s| s.control_plane.trim_end_matches('/') == wanted)
        .map(|s| s.token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_stored_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config/falaj/session");
        assert_eq!(load_session(&path).unwrap(), None);
        let session = StoredSession {
            control_plane: "http://127.0.0.1:7080".into(),
            user: "alice".into(),
            token: "falaj_s_00".into(),
            expires_at: Timestamp::from_unix(1_800_000_000),
        };
        save_session(&path, &session).unwrap();
        assert_eq!(load_session(&path).unwrap(), Some(session));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(path.parent().unwrap()), 0o700);
        }
        std::fs::write(&path, "{").unwrap();
        assert!(load_session(&path).unwrap_err().message().contains("log in again"));
    }
}
