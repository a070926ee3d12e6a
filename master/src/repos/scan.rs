//! Reading a repository into a commit: a git working copy at a commit (HEAD by default),
//! read from git's object store so that uncommitted edits never leak in; or a plain
//! folder as it is now, whose commit is a hash of its files' paths and contents.
//!
//! Every call blocks (files, `git` processes). The folder is one
//! [`RepositoriesRoot::folder`](super::root::RepositoriesRoot::folder) answered: canonical,
//! inside the root. Files are opened without following links, and each opened file must
//! really be inside the folder (a folder swapped for a link during the scan leads out);
//! the files together may hold at most the root's `max_bytes`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use tether_common::code::{Hash, content_hash};
use tether_common::protocol::FileEntry;

/// The largest file a repository may hold: a blob travels in one frame.
pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// The most files a repository may hold.
pub const MAX_FILES: usize = 10_000;

/// A repository read at one commit.
#[derive(Debug)]
pub struct Scanned {
    /// The commit.
    pub commit: String,
    /// The files, by path.
    pub files: Vec<FileEntry>,
    /// Each file's content, by hash.
    pub blobs: Vec<(Hash, Vec<u8>)>,
}

impl Scanned {
    fn new(commit: String, mut contents: Vec<(String, Vec<u8>)>) -> Scanned {
        contents.sort_by(|a, b| a.0.cmp(&b.0));
        let mut files = Vec::with_capacity(contents.len());
        let mut blobs = Vec::with_capacity(contents.len());
        for (path, data) in contents {
            let hash = content_hash(&data);
            files.push(FileEntry {
                path,
                hash,
                size: data.len() as u64,
            });
            blobs.push((hash, data));
        }
        Scanned {
            commit,
            files,
            blobs,
        }
    }
}

/// Whether `path` is a git working copy.
pub fn is_git(path: &Path) -> bool {
    path.join(".git").exists()
}

/// Reads a repository: a git working copy at `commit` (HEAD when `None`), or a folder as
/// it is (a folder has no history here, so `commit` must be `None`); its files may hold
/// at most `max_bytes` in all.
pub fn scan(path: &Path, commit: Option<&str>, max_bytes: u64) -> Result<Scanned, String> {
    if !path.is_dir() {
        return Err(format!("{} is not a folder", path.display()));
    }
    let mut size = Size::new(max_bytes);
    if is_git(path) {
        // The object store must be the folder's own: a `.git` file or link could send git
        // to another repository on the master.
        let dot_git = path.join(".git");
        let real = std::fs::symlink_metadata(&dot_git).is_ok_and(|m| m.is_dir());
        if !real {
            return Err(format!(
                "{} is not a folder of the repository's own",
                dot_git.display()
            ));
        }
        scan_git(path, commit.unwrap_or("HEAD"), &mut size)
    } else {
        scan_folder(path, &mut size)
    }
}

/// The bytes of a repository's files so far, against its cap.
struct Size {
    total: u64,
    max: u64,
}

impl Size {
    fn new(max: u64) -> Size {
        Size { total: 0, max }
    }

    fn add(&mut self, path: &str, size: u64) -> Result<(), String> {
        check_size(path, size)?;
        self.total = self.total.saturating_add(size);
        if self.total > self.max {
            return Err(format!(
                "the repository holds more than {} bytes, its limit ([limits] repository_bytes)",
                self.max
            ));
        }
        Ok(())
    }
}

/// Reads a file of the repository `root` without following a link at its end, and makes
/// sure the file opened is inside `root` (a folder on the way may have been swapped for a
/// link since it was listed).
fn read_inside(root: &Path, path: &Path, relative: &str) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) => format!("{relative} became a link while it was read: refused"),
            _ => format!("cannot read {}: {err}", path.display()),
        })?;
    // Where the file opened really is (Linux names it in /proc); not knowing is a refusal.
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|err| format!("{relative}: cannot tell where the file opened is: {err}"))?;
        if !opened.starts_with(root) {
            return Err(format!(
                "{relative} led outside the repository (to {}): refused",
                opened.display()
            ));
        }
    }
    let mut data = Vec::new();
    // Bounded even if the file grew since it was listed.
    (&mut file)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    check_size(relative, data.len() as u64)?;
    Ok(data)
}

/// The commit of a plain folder: the SHA-256 of every file's path and content hash.
pub fn folder_commit(files: &[FileEntry]) -> String {
    let mut digest = Sha256::new();
    for file in files {
        digest.update(file.path.as_bytes());
        digest.update([0]);
        digest.update(file.hash);
    }
    hex::encode(digest.finalize())
}

fn scan_folder(root: &Path, size: &mut Size) -> Result<Scanned, String> {
    let mut contents = Vec::new();
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let entries = std::fs::read_dir(&folder)
            .map_err(|err| format!("cannot list {}: {err}", folder.display()))?;
        for entry in entries {
            let entry = entry.map_err(|err| format!("cannot list {}: {err}", folder.display()))?;
            let name = entry.file_name();
            // Hidden files and folders (.git, editor swap files) are not driver code.
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            if kind.is_dir() {
                folders.push(path);
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let relative = path
                .strip_prefix(root)
                .map_err(|_| format!("{} is outside the repository", path.display()))?
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            let listed = entry.metadata().map(|m| m.len()).unwrap_or(0);
            check_size(&relative, listed)?;
            let data = read_inside(root, &path, &relative)?;
            size.add(&relative, data.len() as u64)?;
            contents.push((relative, data));
            if contents.len() > MAX_FILES {
                return Err(format!(
                    "{} holds more than {MAX_FILES} files",
                    root.display()
                ));
            }
        }
    }
    let mut scanned = Scanned::new(String::new(), contents);
    scanned.commit = folder_commit(&scanned.files);
    Ok(scanned)
}

fn check_size(path: &str, size: u64) -> Result<(), String> {
    if size > MAX_FILE_BYTES {
        return Err(format!(
            "{path} is {size} bytes; a repository file may have at most {MAX_FILE_BYTES}"
        ));
    }
    Ok(())
}

/// Runs git in `repo`; the error carries what git said.
pub fn git(repo: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run git: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(output.stdout)
}

/// Brings a working copy up to its upstream, when it has one (a local repository that
/// is committed to in place has none, and its HEAD is already the newest).
pub fn git_pull(repo: &Path) -> Result<(), String> {
    if git(
        repo,
        &["rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}"],
    )
    .is_err()
    {
        return Ok(());
    }
    git(repo, &["pull", "--ff-only", "--quiet"]).map(|_| ())
}

fn scan_git(repo: &Path, at: &str, size: &mut Size) -> Result<Scanned, String> {
    if at.starts_with('-') {
        return Err(format!("{at:?} is not a commit"));
    }
    let commit = git(
        repo,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{at}^{{commit}}"),
        ],
    )
    .map_err(|_| format!("{at:?} is not a commit of {}", repo.display()))?;
    let commit = String::from_utf8_lossy(&commit).trim().to_string();
    // `mode type object<TAB>path`, NUL-terminated; submodules (type commit) are skipped.
    let listing = git(repo, &["ls-tree", "-r", "-z", "--long", &commit])?;
    let mut objects = Vec::new();
    for entry in listing.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((meta, path)) = entry.split_once('\t') else {
            continue;
        };
        let fields: Vec<&str> = meta.split_whitespace().collect();
        if fields.get(1) != Some(&"blob") {
            continue;
        }
        let bytes = fields.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
        size.add(path, bytes)?;
        objects.push((path.to_string(), fields[2].to_string()));
    }
    if objects.len() > MAX_FILES {
        return Err(format!(
            "{} holds more than {MAX_FILES} files",
            repo.display()
        ));
    }
    let contents = read_git_objects(repo, &objects)?;
    Ok(Scanned::new(commit, contents))
}

/// Reads blobs with one `git cat-file --batch`.
fn read_git_objects(
    repo: &Path,
    objects: &[(String, String)],
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut child = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["cat-file", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|err| format!("cannot run git: {err}"))?;
    let mut stdin = child.stdin.take().ok_or("git cat-file has no stdin")?;
    let names: Vec<String> = objects.iter().map(|(_, id)| format!("{id}\n")).collect();
    // Written from another thread: git answers as it reads, and both pipes are finite.
    let writer = std::thread::spawn(move || {
        for name in names {
            if stdin.write_all(name.as_bytes()).is_err() {
                break;
            }
        }
    });
    let mut out = BufReader::new(child.stdout.take().ok_or("git cat-file has no stdout")?);
    let mut contents = Vec::with_capacity(objects.len());
    for (path, id) in objects {
        let mut header = String::new();
        out.read_line(&mut header)
            .map_err(|err| format!("git cat-file: {err}"))?;
        let size: usize = header
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("git cat-file: cannot read {path} ({id}): {}", header.trim()))?;
        let mut data = vec![0; size + 1];
        out.read_exact(&mut data)
            .map_err(|err| format!("git cat-file: {path}: {err}"))?;
        data.pop();
        contents.push((path.clone(), data));
    }
    let _ = writer.join();
    let _ = child.wait();
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_commit_follows_its_content_and_skips_hidden_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a.rhai"), "fn a() { 1 }").unwrap();
        std::fs::write(dir.path().join("sub/b.rhai"), "fn b() { 2 }").unwrap();
        std::fs::write(dir.path().join(".a.rhai.swp"), "junk").unwrap();
        let first = scan(dir.path(), None, 1 << 20).unwrap();
        let paths: Vec<&str> = first.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.rhai", "sub/b.rhai"]);
        assert_eq!(
            scan(dir.path(), None, 1 << 20).unwrap().commit,
            first.commit
        );
        std::fs::write(dir.path().join("sub/b.rhai"), "fn b() { 3 }").unwrap();
        assert_ne!(
            scan(dir.path(), None, 1 << 20).unwrap().commit,
            first.commit
        );
        assert!(
            scan(&dir.path().join("nope"), None, 1 << 20)
                .unwrap_err()
                .contains("not a folder")
        );
    }

    #[test]
    fn links_out_of_the_repository_and_oversized_repositories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(repo.join("sub")).unwrap();
        std::fs::write(dir.path().join("secret.key"), "CA KEY").unwrap();
        std::fs::write(repo.join("a.rhai"), "fn a() { 1 }").unwrap();
        // A link at listing time is skipped; its target is never read.
        std::os::unix::fs::symlink(dir.path().join("secret.key"), repo.join("key.rhai")).unwrap();
        let repo = repo.canonicalize().unwrap();
        let scanned = scan(&repo, None, 1 << 20).unwrap();
        let paths: Vec<&str> = scanned.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["a.rhai"]);
        // A file swapped for a link between listing and reading is refused.
        let err = read_inside(&repo, &repo.join("key.rhai"), "key.rhai").unwrap_err();
        assert!(err.contains("became a link"), "{err}");
        // A folder swapped for a link: what is opened through it is outside.
        std::fs::remove_dir(repo.join("sub")).unwrap();
        std::os::unix::fs::symlink(dir.path(), repo.join("sub")).unwrap();
        let err = read_inside(&repo, &repo.join("sub/secret.key"), "sub/secret.key").unwrap_err();
        assert!(err.contains("led outside the repository"), "{err}");
        // The size cap names itself.
        std::fs::write(repo.join("b.rhai"), "x".repeat(2000)).unwrap();
        let err = scan(&repo, None, 1000).unwrap_err();
        assert!(err.contains("[limits] repository_bytes"), "{err}");
        // A `.git` that is a file (gitdir: elsewhere) is not the repository's own.
        std::fs::write(repo.join(".git"), "gitdir: /elsewhere").unwrap();
        let err = scan(&repo, None, 1 << 20).unwrap_err();
        assert!(
            err.contains("not a folder of the repository's own"),
            "{err}"
        );
    }

    #[test]
    fn a_git_working_copy_is_read_at_a_commit_without_uncommitted_edits() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        let run = |args: &[&str]| git(repo, args).unwrap();
        run(&["init", "--quiet"]);
        run(&["config", "user.email", "t@example.com"]);
        run(&["config", "user.name", "t"]);
        std::fs::write(repo.join("a.rhai"), "fn a() { 1 }").unwrap();
        run(&["add", "."]);
        run(&["commit", "--quiet", "-m", "one"]);
        let one = scan(repo, None, 1 << 20).unwrap();
        std::fs::write(repo.join("a.rhai"), "fn a() { 2 }").unwrap();
        run(&["commit", "--quiet", "-am", "two"]);
        std::fs::write(repo.join("a.rhai"), "fn a() { uncommitted }").unwrap();
        let two = scan(repo, None, 1 << 20).unwrap();
        assert_ne!(one.commit, two.commit);
        assert_eq!(two.blobs[0].1, b"fn a() { 2 }");
        let back = scan(repo, Some(&one.commit[..10]), 1 << 20).unwrap();
        assert_eq!(back.commit, one.commit);
        assert_eq!(back.blobs[0].1, b"fn a() { 1 }");
        assert!(
            scan(repo, Some("no-such-commit"), 1 << 20)
                .unwrap_err()
                .contains("not a commit")
        );
        assert!(
            scan(repo, Some("--help"), 1 << 20)
                .unwrap_err()
                .contains("not a commit")
        );
        git_pull(repo).unwrap();
    }
}
