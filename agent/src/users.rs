//! Users and groups written straight into the root's /etc/passwd, /etc/shadow, /etc/group
//! (and /etc/gshadow when it exists): no useradd, and no libc NSS lookups (the binary is
//! static and the root may be a test tree).

use std::io::Read;
use std::path::Path;

use crate::Ctx;
use crate::config::schema::{Entity, User};
use crate::safe_fs;
use crate::safe_fs::{read_under, write_under};

pub const PASSWD: &str = "/etc/passwd";
pub const SHADOW: &str = "/etc/shadow";
pub const GROUP: &str = "/etc/group";
pub const GSHADOW: &str = "/etc/gshadow";

/// First and last ids handed out to regular users and groups, as Debian's login.defs.
const FIRST_ID: u32 = 1000;
const LAST_ID: u32 = 59999;
const FIRST_SYSTEM_ID: u32 = 100;

/// A colon-separated database: one entry per line, its fields.
struct Db {
    rows: Vec<Vec<String>>,
    /// Fields per entry, for padding short lines.
    width: usize,
}

impl Db {
    fn read(ctx: &Ctx, path: &str, width: usize) -> Result<Db, String> {
        let text = String::from_utf8_lossy(&read_under(ctx, path)?).into_owned();
        let rows = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split(':').map(str::to_owned).collect())
            .collect();
        Ok(Db { rows, width })
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.rows
            .iter()
            .position(|r| r.first().map(String::as_str) == Some(name))
    }

    fn get(&self, i: usize, field: usize) -> &str {
        self.rows
            .get(i)
            .and_then(|r| r.get(field))
            .map(String::as_str)
            .unwrap_or("")
    }

    fn set(&mut self, i: usize, field: usize, v: &str) {
        if let Some(r) = self.rows.get_mut(i) {
            while r.len() < self.width.max(field + 1) {
                r.push(String::new());
            }
            r[field] = v.to_owned();
        }
    }

    fn ids(&self, field: usize) -> Vec<u32> {
        self.rows
            .iter()
            .filter_map(|r| r.get(field).and_then(|s| s.parse().ok()))
            .collect()
    }

    fn text(&self) -> String {
        let mut s = String::new();
        for r in &self.rows {
            s.push_str(&r.join(":"));
            s.push('\n');
        }
        s
    }

    /// Replace the file, keeping its mode and owner (or `mode` for a new one).
    fn write(&self, ctx: &Ctx, path: &str, mode: u32) -> Result<(), String> {
        let (mode, ids) = match safe_fs::file_meta(&ctx.root, Path::new(path)) {
            Ok(Some((m, uid, gid))) => (m, Some((Some(uid), Some(gid)))),
            Ok(None) => (mode, None),
            Err(e) => return Err(e.to_string()),
        };
        write_under(ctx, path, self.text().as_bytes(), mode, ids)
    }
}

fn free_id(taken: &[u32], wanted: Option<u32>, system: bool) -> u32 {
    if let Some(w) = wanted.filter(|w| !taken.contains(w)) {
        return w;
    }
    if system {
        return (FIRST_SYSTEM_ID..FIRST_ID)
            .rev()
            .find(|i| !taken.contains(i))
            .unwrap_or(FIRST_ID - 1);
    }
    // After the highest regular id in use, as useradd does.
    let high = taken
        .iter()
        .copied()
        .filter(|i| (FIRST_ID..=LAST_ID).contains(i))
        .max()
        .map_or(FIRST_ID, |m| m + 1);
    (high..=LAST_ID)
        .chain(FIRST_ID..high)
        .find(|i| !taken.contains(i))
        .unwrap_or(high)
}

/// Days since the epoch, shadow's date unit.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (secs / 86400).to_string()
}

/// A crypt(3) hash for `passwd`: a hash or lock marker as given, clear text hashed with
/// SHA-512-crypt (what Debian uses).
pub fn password_hash(passwd: &str) -> Result<String, String> {
    if passwd.starts_with('$') || passwd.starts_with('!') || passwd == "*" || passwd == "x" {
        return Ok(passwd.to_owned());
    }
    use sha_crypt::{PasswordHasher, ShaCrypt};
    let mut salt = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    ShaCrypt::default()
        .hash_password_with_salt(passwd.as_bytes(), &salt)
        .map(|h| h.as_str().to_owned())
        .map_err(|e| format!("hashing the password: {e}"))
}

/// The uid and primary gid of `name` (or a number) from the root's /etc/passwd.
pub fn lookup_user(ctx: &Ctx, name: &str) -> Result<(u32, u32), String> {
    let db = Db::read(ctx, PASSWD, 7)?;
    if let Some(i) = db.find(name) {
        let uid = db
            .get(i, 2)
            .parse()
            .map_err(|_| format!("{PASSWD}: {name}: bad uid"))?;
        let gid = db
            .get(i, 3)
            .parse()
            .map_err(|_| format!("{PASSWD}: {name}: bad gid"))?;
        return Ok((uid, gid));
    }
    if let Ok(n) = name.parse::<u32>() {
        return Ok((n, n));
    }
    Err(format!("no user {name:?} in {PASSWD}"))
}

pub fn lookup_group(ctx: &Ctx, name: &str) -> Result<u32, String> {
    let db = Db::read(ctx, GROUP, 4)?;
    if let Some(i) = db.find(name) {
        return db
            .get(i, 2)
            .parse()
            .map_err(|_| format!("{GROUP}: {name}: bad gid"));
    }
    name.parse()
        .map_err(|_| format!("no group {name:?} in {GROUP}"))
}

/// The groups: /etc/group and, when the system has one, /etc/gshadow.
struct Groups {
    group: Db,
    gshadow: Option<Db>,
}

impl Groups {
    fn read(ctx: &Ctx) -> Result<Groups, String> {
        let gshadow = if ctx.path(GSHADOW).exists() {
            Some(Db::read(ctx, GSHADOW, 4)?)
        } else {
            None
        };
        Ok(Groups {
            group: Db::read(ctx, GROUP, 4)?,
            gshadow,
        })
    }

    /// The gid of group `name`, creating it (with `wanted` if free) when missing.
    fn ensure(&mut self, name: &str, wanted: Option<u32>, system: bool) -> u32 {
        if let Some(i) = self.group.find(name)
            && let Ok(g) = self.group.get(i, 2).parse()
        {
            return g;
        }
        let gid = free_id(&self.group.ids(2), wanted, system);
        self.group.rows.push(vec![
            name.into(),
            "x".into(),
            gid.to_string(),
            String::new(),
        ]);
        if let Some(gs) = &mut self.gshadow
            && gs.find(name).is_none()
        {
            gs.rows
                .push(vec![name.into(), "!".into(), String::new(), String::new()]);
        }
        gid
    }

    fn add_member(&mut self, group: &str, user: &str) {
        for (db, field) in [(Some(&mut self.group), 3), (self.gshadow.as_mut(), 3)] {
            let Some(db) = db else { continue };
            if let Some(i) = db.find(group) {
                let mut members: Vec<String> = db
                    .get(i, field)
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect();
                if !members.iter().any(|m| m == user) {
                    members.push(user.to_owned());
                    db.set(i, field, &members.join(","));
                }
            }
        }
    }

    fn write(&self, ctx: &Ctx) -> Result<(), String> {
        self.group.write(ctx, GROUP, 0o644)?;
        if let Some(gs) = &self.gshadow {
            gs.write(ctx, GSHADOW, 0o640)?;
        }
        Ok(())
    }
}

/// Create or update a user. An existing user gets its password, groups and keys updated
/// and keeps the rest (as upstream).
pub fn ensure_user(ctx: &Ctx, name: &str, u: &User) -> Result<(), String> {
    let name = u.name.as_deref().filter(|n| !n.is_empty()).unwrap_or(name);
    if name.is_empty() || name.contains([':', '/', '\n', ' ', ',']) {
        return Err(format!("{name:?}: not a valid user name"));
    }
    let mut passwd = Db::read(ctx, PASSWD, 7)?;
    let mut shadow = Db::read(ctx, SHADOW, 9)?;
    let mut groups = Groups::read(ctx)?;
    let existing = passwd.find(name);
    let (uid, gid, home, created) = match existing {
        Some(i) => {
            let uid = passwd
                .get(i, 2)
                .parse()
                .map_err(|_| format!("{PASSWD}: {name}: bad uid"))?;
            let gid = passwd
                .get(i, 3)
                .parse()
                .map_err(|_| format!("{PASSWD}: {name}: bad gid"))?;
            (uid, gid, passwd.get(i, 5).to_owned(), false)
        }
        None => {
            let uid = free_id(&passwd.ids(2), u.uid, u.system);
            let gid = match (&u.primary_group, u.no_user_group) {
                (Some(g), _) => groups.ensure(g, None, u.system),
                (None, true) => groups.ensure("users", Some(100), true),
                (None, false) => groups.ensure(name, Some(uid), u.system),
            };
            let home = u.homedir.clone().unwrap_or_else(|| format!("/home/{name}"));
            let shell = u.shell.clone().unwrap_or_else(|| "/bin/sh".into());
            passwd.rows.push(vec![
                name.into(),
                "x".into(),
                uid.to_string(),
                gid.to_string(),
                u.gecos.clone().unwrap_or_default(),
                home.clone(),
                shell,
            ]);
            (uid, gid, home, true)
        }
    };
    // The password lives in shadow; a new user without one is locked.
    let hash = match &u.passwd {
        Some(p) => Some(password_hash(p)?),
        None if created => Some("!".to_owned()),
        None => None,
    };
    let si = match shadow.find(name) {
        Some(i) => i,
        None => {
            shadow.rows.push(vec![
                name.into(),
                "!".into(),
                today(),
                "0".into(),
                "99999".into(),
                "7".into(),
                String::new(),
                String::new(),
                String::new(),
            ]);
            shadow.rows.len() - 1
        }
    };
    if let Some(h) = hash {
        shadow.set(si, 1, &h);
        shadow.set(si, 2, &today());
        if let Some(i) = passwd.find(name) {
            passwd.set(i, 1, "x");
        }
    }
    for g in &u.groups {
        groups.ensure(g, None, false);
        groups.add_member(g, name);
    }
    groups.write(ctx)?;
    passwd.write(ctx, PASSWD, 0o644)?;
    shadow.write(ctx, SHADOW, 0o640)?;
    let make_home = created && !u.no_create_home && !u.system && !home.is_empty();
    if make_home && !safe_fs::is_dir(&ctx.root, Path::new(&home)) {
        let ids = Some((Some(uid), Some(gid)));
        safe_fs::make_dir(&ctx.root, Path::new(&home), 0o755, ids).map_err(|e| e.to_string())?;
    }
    if !u.ssh_authorized_keys.is_empty() {
        add_keys(ctx, name, &u.ssh_authorized_keys)?;
    }
    Ok(())
}

/// Append keys missing from `~user/.ssh/authorized_keys` (0600 in a 0700 .ssh, owned by
/// the user).
pub fn add_keys(ctx: &Ctx, user: &str, keys: &[String]) -> Result<(), String> {
    let passwd = Db::read(ctx, PASSWD, 7)?;
    let i = passwd
        .find(user)
        .ok_or_else(|| format!("no user {user:?} in {PASSWD}"))?;
    let uid: u32 = passwd
        .get(i, 2)
        .parse()
        .map_err(|_| format!("{PASSWD}: {user}: bad uid"))?;
    let gid: u32 = passwd
        .get(i, 3)
        .parse()
        .map_err(|_| format!("{PASSWD}: {user}: bad gid"))?;
    let home = passwd.get(i, 5);
    if home.is_empty() || !home.starts_with('/') {
        return Err(format!("{user}: no home directory in {PASSWD}"));
    }
    let mut errs = Vec::new();
    let mut wanted = Vec::new();
    for k in keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()) {
        // Upstream fetches these from the forge; this agent does not.
        if k.starts_with("github:") || k.starts_with("gitlab:") {
            errs.push(format!(
                "{k}: keys from GitHub/GitLab are not fetched by this agent; skipped"
            ));
            continue;
        }
        wanted.push(k.to_owned());
    }
    // The user owns their home: nothing in it is followed unless root put it there.
    let dir = format!("{}/.ssh", home.trim_end_matches('/'));
    let ids = Some((Some(uid), Some(gid)));
    safe_fs::make_dir(&ctx.root, Path::new(&dir), 0o700, ids).map_err(|e| e.to_string())?;
    let file = format!("{dir}/authorized_keys");
    let mut text = String::from_utf8_lossy(&read_under(ctx, &file)?).into_owned();
    for k in wanted {
        if !text.lines().any(|l| l.trim() == k) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&k);
            text.push('\n');
        }
    }
    write_under(ctx, &file, text.as_bytes(), 0o600, ids)?;
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// An entity in the `entities` format upstream uses (kind user, group, shadow, gshadow).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct EntityDoc {
    #[serde(deserialize_with = "crate::config::de::string")]
    kind: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    username: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    group_name: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    name: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    password: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    uid: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    gid: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    info: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    homedir: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    shell: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    users: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    last_changed: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    minimum_changed: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    maximum_changed: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    warn: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    inactive: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    expire: String,
    #[serde(deserialize_with = "crate::config::de::string")]
    administrators: String,
}

impl EntityDoc {
    /// The database line this entity stands for: (key, fields, width).
    fn row(&self) -> Result<(String, Vec<String>, usize), String> {
        Ok(match self.kind.as_str() {
            "user" => (
                self.username.clone(),
                vec![
                    self.username.clone(),
                    self.password.clone(),
                    self.uid.clone(),
                    self.gid.clone(),
                    self.info.clone(),
                    self.homedir.clone(),
                    self.shell.clone(),
                ],
                7,
            ),
            "group" => (
                self.group_name.clone(),
                vec![
                    self.group_name.clone(),
                    self.password.clone(),
                    self.gid.clone(),
                    self.users.clone(),
                ],
                4,
            ),
            "shadow" => (
                self.username.clone(),
                vec![
                    self.username.clone(),
                    self.password.clone(),
                    if self.last_changed == "now" {
                        today()
                    } else {
                        self.last_changed.clone()
                    },
                    self.minimum_changed.clone(),
                    self.maximum_changed.clone(),
                    self.warn.clone(),
                    self.inactive.clone(),
                    self.expire.clone(),
                    String::new(),
                ],
                9,
            ),
            "gshadow" => (
                self.name.clone(),
                vec![
                    self.name.clone(),
                    self.password.clone(),
                    self.administrators.clone(),
                    self.users.clone(),
                ],
                4,
            ),
            other => {
                return Err(format!(
                    "entity kind {other:?} is not supported (user, group, shadow, gshadow)"
                ));
            }
        })
    }
}

fn entity(e: &Entity) -> Result<(String, Vec<String>, usize), String> {
    if !e.path.starts_with('/') {
        return Err(format!("{:?}: not an absolute path", e.path));
    }
    let doc: EntityDoc = serde_saphyr::from_str(&e.entity).map_err(|err| {
        let at = err
            .location()
            .map(|l| format!(" (entity line {})", l.line()))
            .unwrap_or_default();
        format!("entity{at}: {}", err.without_snippet())
    })?;
    let (key, row, width) = doc.row()?;
    if key.is_empty() || key.contains([':', '\n']) {
        return Err(format!("entity {:?}: no valid name", doc.kind));
    }
    Ok((key, row, width))
}

/// Add or replace the entity's line in its file.
pub fn ensure_entity(ctx: &Ctx, e: &Entity) -> Result<(), String> {
    let (key, row, width) = entity(e)?;
    let mut db = Db::read(ctx, &e.path, width)?;
    match db.find(&key) {
        Some(i) => db.rows[i] = row,
        None => db.rows.push(row),
    }
    // shadow and gshadow hold hashes: not world-readable when created.
    let mode = if e.path.ends_with("shadow") {
        0o640
    } else {
        0o644
    };
    db.write(ctx, &e.path, mode)
}

/// Remove the entity's line from its file (nothing to do when absent).
pub fn delete_entity(ctx: &Ctx, e: &Entity) -> Result<(), String> {
    let (key, _, width) = entity(e)?;
    let mut db = Db::read(ctx, &e.path, width)?;
    if let Some(i) = db.find(&key) {
        db.rows.remove(i);
        db.write(ctx, &e.path, 0o644)?;
    }
    Ok(())
}
