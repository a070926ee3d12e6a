//! Driver code on disk, beside the model in the same database: blobs by content hash,
//! each repository commit's manifest, and the commit each repository is at here (the
//! head). The master keeps every commit it has scanned (so a folder repository can be
//! reset to one); an edge keeps what it was sent.

use std::collections::{BTreeSet, HashMap};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, StoreError};
use crate::code::{Code, Hash, RepoCode};
use crate::protocol::FileEntry;

/// Content hash to content.
const BLOBS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("code_blobs");
/// (repository, commit) to its postcard `Vec<FileEntry>`.
const MANIFESTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("code_manifests");
/// Repository to the commit this side runs.
const HEADS: TableDefinition<&str, &str> = TableDefinition::new("code_heads");

/// A table that was never written reads as empty.
macro_rules! open_or_empty {
    ($store:expr, $txn:expr, $table:expr, $empty:expr) => {
        match $txn.open_table($table) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok($empty),
            Err(err) => return Err($store.db_error(err)),
        }
    };
}

/// A commit of a repository: its manifest and the content of its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitCode {
    /// The files.
    pub files: Vec<FileEntry>,
    /// Each file's content by hash.
    pub blobs: HashMap<Hash, Vec<u8>>,
}

/// Driver code the masters of a cluster share: a master that reads a new commit puts it
/// there before its repository's record names it, so that every master that sees the
/// record can fetch the commit and run the same code.
pub trait SharedCode: Send + Sync {
    /// Stores `commit` of `repository` (blobs already there are left alone).
    fn put(
        self: std::sync::Arc<Self>,
        repository: String,
        commit: String,
        code: CommitCode,
    ) -> super::Pending<Result<(), StoreError>>;

    /// `commit` of `repository`, if some master put it.
    fn get(
        self: std::sync::Arc<Self>,
        repository: String,
        commit: String,
    ) -> super::Pending<Result<Option<CommitCode>, StoreError>>;
}

impl Store {
    /// The hashes of `wanted` this store does not hold, each once.
    pub fn missing_blobs(&self, wanted: &[Hash]) -> Result<Vec<Hash>, StoreError> {
        let unique: BTreeSet<Hash> = wanted.iter().copied().collect();
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let blobs = open_or_empty!(self, txn, BLOBS, unique.into_iter().collect());
        let mut missing = Vec::new();
        for hash in unique {
            if blobs
                .get(hash.as_slice())
                .map_err(|e| self.db_error(e))?
                .is_none()
            {
                missing.push(hash);
            }
        }
        Ok(missing)
    }

    /// Stores blobs; the caller has checked each content against its hash.
    pub fn put_blobs(&self, blobs: &[(Hash, Vec<u8>)]) -> Result<(), StoreError> {
        self.write_txn(|txn| {
            let mut table = txn.open_table(BLOBS)?;
            for (hash, data) in blobs {
                table.insert(hash.as_slice(), data.as_slice())?;
            }
            Ok(())
        })
    }

    /// Reads blobs by hash; those not held are left out.
    pub fn blobs(&self, hashes: &[Hash]) -> Result<HashMap<Hash, Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = open_or_empty!(self, txn, BLOBS, HashMap::new());
        let mut found = HashMap::new();
        for hash in hashes {
            if let Some(data) = table.get(hash.as_slice()).map_err(|e| self.db_error(e))? {
                found.insert(*hash, data.value().to_vec());
            }
        }
        Ok(found)
    }

    /// Stores a commit's manifest (its blobs stored already) and, with `head`, makes it
    /// the commit this side runs, in one transaction.
    pub fn put_commit(
        &self,
        repository: &str,
        commit: &str,
        files: &[FileEntry],
        head: bool,
    ) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(files).unwrap_or_default();
        self.write_txn(|txn| {
            txn.open_table(MANIFESTS)?
                .insert((repository, commit), bytes.as_slice())?;
            if head {
                txn.open_table(HEADS)?.insert(repository, commit)?;
            }
            Ok(())
        })
    }

    /// A commit's manifest, if this store has it.
    pub fn manifest(
        &self,
        repository: &str,
        commit: &str,
    ) -> Result<Option<Vec<FileEntry>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = open_or_empty!(self, txn, MANIFESTS, None);
        let Some(bytes) = table
            .get((repository, commit))
            .map_err(|e| self.db_error(e))?
        else {
            return Ok(None);
        };
        postcard::from_bytes(bytes.value())
            .map(Some)
            .map_err(|err| {
                self.corrupt(format!(
                    "manifest of {repository} at {commit} does not decode: {err}"
                ))
            })
    }

    /// A commit's code, if this store has its manifest and every blob.
    pub fn repo_code(
        &self,
        repository: &str,
        commit: &str,
    ) -> Result<Option<RepoCode>, StoreError> {
        let Some(files) = self.manifest(repository, commit)? else {
            return Ok(None);
        };
        let hashes: Vec<Hash> = files.iter().map(|f| f.hash).collect();
        let blobs = self.blobs(&hashes)?;
        match RepoCode::new(commit.to_string(), files, |hash| blobs.get(hash).cloned()) {
            Ok(code) => Ok(Some(code)),
            Err(missing) => Err(self.corrupt(format!("{repository} at {commit}: {missing}"))),
        }
    }

    /// Each repository's head commit.
    pub fn heads(&self) -> Result<Vec<(String, String)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let table = open_or_empty!(self, txn, HEADS, Vec::new());
        let mut heads = Vec::new();
        for entry in table.iter().map_err(|e| self.db_error(e))? {
            let (repository, commit) = entry.map_err(|e| self.db_error(e))?;
            heads.push((repository.value().to_string(), commit.value().to_string()));
        }
        Ok(heads)
    }

    /// The code at every head.
    pub fn load_code(&self) -> Result<Code, StoreError> {
        let mut code = Code::default();
        for (repository, commit) in self.heads()? {
            let repo = self.repo_code(&repository, &commit)?.ok_or_else(|| {
                self.corrupt(format!(
                    "the manifest of {repository} at {commit} (its head) is missing"
                ))
            })?;
            code = code.with(&repository, repo);
        }
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code::content_hash;

    #[test]
    fn commits_and_blobs_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("code.redb");
        let data = b"fn version() { 1 }".to_vec();
        let hash = content_hash(&data);
        let files = vec![FileEntry {
            path: "d.rhai".into(),
            hash,
            size: data.len() as u64,
        }];
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.missing_blobs(&[hash, hash]).unwrap(), vec![hash]);
            assert!(store.load_code().unwrap().commits().is_empty());
            store.put_blobs(&[(hash, data.clone())]).unwrap();
            store.put_commit("core", "c1", &files, false).unwrap();
            assert!(store.heads().unwrap().is_empty());
            store.put_commit("core", "c1", &files, true).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert!(store.missing_blobs(&[hash]).unwrap().is_empty());
        let code = store.load_code().unwrap();
        assert_eq!(
            &*code.source("core", "d.rhai").unwrap(),
            "fn version() { 1 }"
        );
        assert_eq!(store.manifest("core", "c1").unwrap(), Some(files));
        assert_eq!(store.manifest("core", "c2").unwrap(), None);
    }
}
