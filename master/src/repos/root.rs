//! Where driver repositories may be: folders inside `repositories_root`, a root that holds
//! nothing the master keeps to itself. A repository is read into the code store that
//! edges fetch from, so a path that reached the certificate folder would hand the CA key
//! and every edge secret to any edge (and to anyone with an admin token).
//!
//! A path is checked when a repository is created, seeded or read: relative to the root,
//! or absolute inside it, without `..`, and inside the root once every link in it is
//! followed (a symlinked folder pointing out is outside). The scan then opens each file
//! without following a link and checks where the opened file really is ([`scan`](super::scan)),
//! so a file swapped for a link during the scan is refused too.

use std::path::{Component, Path, PathBuf};

/// The repositories root, canonical.
#[derive(Debug, Clone)]
pub struct RepositoriesRoot {
    root: PathBuf,
    /// The most bytes one repository's files may hold (`[limits] repository_bytes`).
    pub max_bytes: u64,
}

impl RepositoriesRoot {
    /// The root at `path` (created if missing), refused if it holds any of `private`
    /// (what, path): the folders of the master's certificate, key and CA, the edges'
    /// secrets, the data folder.
    pub fn open(path: &Path, private: &[(&str, &Path)], max_bytes: u64) -> Result<Self, String> {
        std::fs::create_dir_all(path).map_err(|err| {
            format!(
                "repositories_root {}: cannot create it: {err}",
                path.display()
            )
        })?;
        let root = path
            .canonicalize()
            .map_err(|err| format!("repositories_root {}: {err}", path.display()))?;
        for (what, private) in private {
            // A file's folder is what the root must not hold (its neighbours are secrets
            // too); a folder is itself.
            let folder = if private.is_dir() {
                private.to_path_buf()
            } else {
                private.parent().map(Path::to_path_buf).unwrap_or_default()
            };
            let Ok(folder) = folder.canonicalize() else {
                continue;
            };
            if folder.starts_with(&root) {
                return Err(format!(
                    "repositories_root {} holds the {what} ({}): repositories are read into the code that edges fetch, so the root must hold no certificate, key, secret or data folder",
                    root.display(),
                    private.display()
                ));
            }
        }
        Ok(RepositoriesRoot { root, max_bytes })
    }

    /// The root.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The canonical folder a repository's `path` names: relative to the root, or
    /// absolute inside it; never with `..`, never outside once links are followed.
    pub fn folder(&self, path: &str) -> Result<PathBuf, String> {
        let given = Path::new(path);
        if path.is_empty() {
            return Err("a repository needs a path".into());
        }
        if given
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(format!(
                "path {path:?}: `..` is not allowed in a repository's path"
            ));
        }
        let joined = if given.is_absolute() {
            given.to_path_buf()
        } else {
            self.root.join(given)
        };
        let folder = joined
            .canonicalize()
            .map_err(|err| format!("path {path:?} is not a folder on the master: {err}"))?;
        if !folder.starts_with(&self.root) {
            return Err(format!(
                "path {path:?} is outside repositories_root {}",
                self.root.display()
            ));
        }
        if !folder.is_dir() {
            return Err(format!("path {path:?} is not a folder"));
        }
        Ok(folder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_inside_the_root_are_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let root_path = dir.path().join("repos");
        let outside = dir.path().join("certs");
        std::fs::create_dir_all(root_path.join("core/sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root_path.join("escape")).unwrap();
        let root = RepositoriesRoot::open(&root_path, &[], 1 << 20).unwrap();
        let inside = root.folder("core").unwrap();
        assert!(inside.ends_with("repos/core"));
        assert_eq!(root.folder(inside.to_str().unwrap()).unwrap(), inside);
        assert!(root.folder("core/sub").is_ok());
        for (path, why) in [
            ("../certs", "`..`"),
            ("core/../../certs", "`..`"),
            (outside.to_str().unwrap(), "outside repositories_root"),
            ("/etc", "outside repositories_root"),
            ("escape", "outside repositories_root"),
            ("missing", "not a folder"),
            ("", "needs a path"),
        ] {
            let err = root.folder(path).unwrap_err();
            assert!(err.contains(why), "{path:?}: {err}");
        }
    }

    #[test]
    fn a_root_that_holds_the_certificates_or_the_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        std::fs::write(dir.path().join("certs/ca.key"), "secret").unwrap();
        let key = dir.path().join("certs/ca.key");
        let err = RepositoriesRoot::open(dir.path(), &[("CA key", &key)], 1).unwrap_err();
        assert!(err.contains("holds the CA key"), "{err}");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let err = RepositoriesRoot::open(dir.path(), &[("data folder", &data)], 1).unwrap_err();
        assert!(err.contains("holds the data folder"), "{err}");
        // A root beside them is fine, and made when missing.
        let root = RepositoriesRoot::open(
            &dir.path().join("repos"),
            &[("CA key", &key), ("data folder", &data)],
            1,
        )
        .unwrap();
        assert!(root.path().is_dir());
    }
}
