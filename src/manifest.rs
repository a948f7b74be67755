//! The build manifest: one JSON file, a record appended per build (never clobbered), read back
//! by people, CI and `jbake roll`.

use std::path::Path;

/// One build (or skipped build) in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Build {
    pub build_id: String,
    pub recipe: String,
    pub name: String,
    pub ami_id: String,
    pub region: String,
    pub version: String,
    pub content_hash: String,
    pub base_ami: String,
    pub jbake_version: String,
    pub started_at: String,
    pub finished_at: String,
    /// True when an image with the same content hash existed and nothing was built.
    pub skipped_unchanged: bool,
    /// `regions`: every region's image id (the build's own and its copies'); `shared_with`;
    /// `published`: the SSM parameters naming them. (Records of jbake before copies have only
    /// `ami_id` and `region`.)
    #[serde(flatten)]
    pub distributed: crate::bake::distribute::Distributed,
    /// The boot test's verdict on the image (`jbake:tested`); absent: not tested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tested: Option<bool>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub builds: Vec<Build>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the manifest {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the manifest {path} is not a jbake manifest ({detail}); move it away or pick another --manifest")]
    Parse { path: String, detail: String },
    #[error("cannot write the manifest {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &Path) -> Result<Manifest, Error> {
    let p = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(Manifest::default()),
        Ok(text) => serde_json::from_str::<Manifest>(&text).map_err(|e| Error::Parse {
            path: p,
            detail: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
        Err(source) => Err(Error::Read { path: p, source }),
    }
}

fn folder(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Checks, before a build launches anything, that its record can be written at the end: the
/// file is readable and a jbake manifest (or missing or empty), and its folder takes a new file
/// (the manifest is replaced atomically, through a temporary file in that folder).
pub fn check(path: &Path) -> Result<(), Error> {
    read(path)?;
    let write = || -> std::io::Result<()> {
        let probe = tempfile::NamedTempFile::new_in(folder(path))?;
        probe.close()
    };
    write().map_err(|source| Error::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Appends `build` to the manifest at `path` (created if missing), atomically. Builds that end
/// at the same moment take turns (an exclusive lock on `.NAME.lock` beside it), so none of their
/// records is lost.
pub fn append(path: &Path, build: Build) -> Result<(), Error> {
    let p = path.display().to_string();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "manifest".to_string());
    let lock_path = folder(path).join(format!(".{name}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .and_then(|f| f.lock().map(|()| f))
        .map_err(|source| Error::Write {
            path: lock_path.display().to_string(),
            source,
        })?;
    let mut manifest = read(path)?;
    manifest.builds.push(build);
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Parse {
        path: p.clone(),
        detail: e.to_string(),
    })?;
    let dir = folder(path);
    let write = || -> std::io::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        std::io::Write::write_all(&mut tmp, text.as_bytes())?;
        std::io::Write::write_all(&mut tmp, b"\n")?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    };
    let written = write().map_err(|source| Error::Write { path: p, source });
    drop(lock);
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(id: &str) -> Build {
        Build {
            build_id: id.into(),
            recipe: "r".into(),
            name: "r-2026.11.28-1".into(),
            ami_id: "ami-1".into(),
            region: "us-east-1".into(),
            version: "2026.11.28-1".into(),
            content_hash: "h".into(),
            base_ami: "ami-0".into(),
            jbake_version: "0.1.0".into(),
            started_at: "t0".into(),
            finished_at: "t1".into(),
            skipped_unchanged: false,
            distributed: Default::default(),
            tested: Some(true),
        }
    }

    #[test]
    fn appends_and_never_clobbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        append(&p, build("a")).unwrap();
        append(&p, build("b")).unwrap();
        let m: Manifest = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(
            m.builds
                .iter()
                .map(|b| b.build_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        std::fs::write(&p, "not json").unwrap();
        assert!(matches!(append(&p, build("c")), Err(Error::Parse { .. })));
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "not json",
            "a bad file is left alone"
        );
    }

    #[test]
    fn records_list_every_region_and_old_records_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        let mut b = build("a");
        b.distributed.regions = [
            ("us-east-1".to_string(), "ami-1".to_string()),
            ("us-west-2".to_string(), "ami-2".to_string()),
        ]
        .into();
        append(&p, b).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["builds"][0]["regions"]["us-west-2"], "ami-2");
        assert!(v["builds"][0].get("published").is_none());
        // A manifest written before copies existed.
        let old = r#"{"builds": [{"build_id": "x", "recipe": "r", "name": "r-1", "ami_id": "ami-1",
            "region": "us-east-1", "version": "v", "content_hash": "h", "base_ami": "ami-0",
            "jbake_version": "0.1.0", "started_at": "t0", "finished_at": "t1",
            "skipped_unchanged": false}]}"#;
        std::fs::write(&p, old).unwrap();
        append(&p, build("b")).unwrap();
        let m: Manifest = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(m.builds.len(), 2);
        assert!(m.builds[0].distributed.regions.is_empty());
    }

    #[test]
    fn builds_ending_at_once_lose_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || append(&p, build(&format!("b{i}"))).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let m: Manifest = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(m.builds.len(), 8);
    }

    #[test]
    fn check_finds_what_would_fail_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        assert!(
            check(&p).is_ok(),
            "a missing manifest is created at the end"
        );
        append(&p, build("a")).unwrap();
        assert!(check(&p).is_ok());
        std::fs::write(&p, "{\"builds\": 3}").unwrap();
        assert!(matches!(check(&p), Err(Error::Parse { .. })));
        assert!(
            matches!(check(dir.path()), Err(Error::Read { .. })),
            "a folder"
        );
        let missing = dir.path().join("no/such/folder/m.json");
        assert!(matches!(check(&missing), Err(Error::Write { .. })));
    }
}
