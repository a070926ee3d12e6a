//! Driver code: each repository's files at one commit, named by content hash. The master
//! scans repositories into this form; an edge receives the manifest (paths and hashes)
//! and fetches only the blobs it lacks ([`fetch`]); both keep them in their store and run
//! the scripts from here.

pub mod fetch;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::protocol::FileEntry;

/// A SHA-256 content hash.
pub type Hash = [u8; 32];

/// The SHA-256 of `data`.
pub fn content_hash(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// The first 12 characters of a commit, for logs and debug lines.
pub fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// One repository at one commit: its files, and the text of those that are UTF-8 (the
/// scripts).
#[derive(Debug, Clone, Default)]
pub struct RepoCode {
    /// The commit.
    pub commit: String,
    /// Every file, by path.
    pub files: Vec<FileEntry>,
    texts: HashMap<String, Arc<str>>,
}

impl RepoCode {
    /// The repository at `commit`, with each file's content from `blob`; an error names
    /// a file whose blob is missing.
    pub fn new(
        commit: String,
        files: Vec<FileEntry>,
        mut blob: impl FnMut(&Hash) -> Option<Vec<u8>>,
    ) -> Result<RepoCode, String> {
        let mut texts = HashMap::new();
        for file in &files {
            let data = blob(&file.hash).ok_or_else(|| {
                format!(
                    "the content of {} ({}) is missing",
                    file.path,
                    hex::encode(file.hash)
                )
            })?;
            if let Ok(text) = String::from_utf8(data) {
                texts.insert(file.path.clone(), Arc::from(text));
            }
        }
        Ok(RepoCode {
            commit,
            files,
            texts,
        })
    }

    /// A repository of text files (for tests and examples).
    pub fn from_texts(commit: &str, texts: &[(&str, &str)]) -> RepoCode {
        let files = texts
            .iter()
            .map(|(path, text)| FileEntry {
                path: path.to_string(),
                hash: content_hash(text.as_bytes()),
                size: text.len() as u64,
            })
            .collect();
        let by_hash: HashMap<Hash, Vec<u8>> = texts
            .iter()
            .map(|(_, text)| (content_hash(text.as_bytes()), text.as_bytes().to_vec()))
            .collect();
        RepoCode::new(commit.to_string(), files, |h| by_hash.get(h).cloned()).unwrap_or_default()
    }

    /// The text of a file.
    pub fn text(&self, path: &str) -> Result<Arc<str>, String> {
        if let Some(text) = self.texts.get(path) {
            return Ok(text.clone());
        }
        if self.files.iter().any(|f| f.path == path) {
            Err(format!(
                "{path} at {} is not UTF-8 text",
                short(&self.commit)
            ))
        } else {
            Err(format!(
                "there is no file {path} at commit {}",
                short(&self.commit)
            ))
        }
    }

    /// The content hash of a file.
    pub fn hash(&self, path: &str) -> Option<Hash> {
        self.files.iter().find(|f| f.path == path).map(|f| f.hash)
    }
}

/// The code one side runs: each repository at its current commit.
#[derive(Debug, Clone, Default)]
pub struct Code {
    repos: BTreeMap<String, Arc<RepoCode>>,
}

impl Code {
    /// This code with `repository` at `code`.
    pub fn with(&self, repository: &str, code: RepoCode) -> Code {
        let mut repos = self.repos.clone();
        repos.insert(repository.to_string(), Arc::new(code));
        Code { repos }
    }

    /// One repository's code.
    pub fn repo(&self, repository: &str) -> Option<&RepoCode> {
        self.repos.get(repository).map(|r| r.as_ref())
    }

    /// A driver's script: `file` of `repository` at its current commit.
    pub fn source(&self, repository: &str, file: &str) -> Result<Arc<str>, String> {
        self.repo(repository)
            .ok_or_else(|| format!("the code of repository {repository} is not here yet"))?
            .text(file)
    }

    /// Each repository's commit.
    pub fn commits(&self) -> BTreeMap<String, String> {
        self.repos
            .iter()
            .map(|(id, code)| (id.clone(), code.commit.clone()))
            .collect()
    }
}

/// The commit an edge reports for the repositories it runs: the commit itself when there
/// is one repository, else `id@commit` for each, comma separated, in id order.
pub fn commit_label(commits: &BTreeMap<String, String>) -> Option<String> {
    match commits.len() {
        0 => None,
        1 => commits.values().next().cloned(),
        _ => Some(
            commits
                .iter()
                .map(|(id, commit)| format!("{id}@{commit}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, data: &[u8]) -> FileEntry {
        FileEntry {
            path: path.into(),
            hash: content_hash(data),
            size: data.len() as u64,
        }
    }

    #[test]
    fn a_repository_serves_its_texts_and_names_what_is_missing() {
        let blobs: HashMap<Hash, Vec<u8>> = [
            (content_hash(b"fn a() {}"), b"fn a() {}".to_vec()),
            (content_hash(&[0xff, 0xfe]), vec![0xff, 0xfe]),
        ]
        .into();
        let files = vec![
            entry("a.rhai", b"fn a() {}"),
            entry("logo.bin", &[0xff, 0xfe]),
        ];
        let repo = RepoCode::new("c1".into(), files, |h| blobs.get(h).cloned()).unwrap();
        let code = Code::default().with("core", repo);
        assert_eq!(&*code.source("core", "a.rhai").unwrap(), "fn a() {}");
        assert!(
            code.source("core", "logo.bin")
                .unwrap_err()
                .contains("not UTF-8")
        );
        assert!(
            code.source("core", "b.rhai")
                .unwrap_err()
                .contains("no file b.rhai")
        );
        assert!(
            code.source("extra", "a.rhai")
                .unwrap_err()
                .contains("not here")
        );
        let missing = RepoCode::new("c2".into(), vec![entry("x", b"x")], |_| None);
        assert!(missing.unwrap_err().contains("content of x"));
    }

    #[test]
    fn the_commit_label_is_the_commit_for_one_repository() {
        let mut commits = BTreeMap::new();
        assert_eq!(commit_label(&commits), None);
        commits.insert("core".to_string(), "abc".to_string());
        assert_eq!(commit_label(&commits).as_deref(), Some("abc"));
        commits.insert("extra".to_string(), "def".to_string());
        assert_eq!(
            commit_label(&commits).as_deref(),
            Some("core@abc,extra@def")
        );
    }
}
