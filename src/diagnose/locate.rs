//! Finding a pod's or a container's memory cgroup on a node, for both kubelet cgroup drivers and every runtime:
//!
//! - systemd driver: pod `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID_>.slice`,
//!   container `cri-containerd-<ID>.scope`, `crio-<ID>.scope` or `docker-<ID>.scope`;
//! - cgroupfs driver: pod `kubepods/burstable/pod<UID>`, container `<ID>` (containerd, docker) or `crio-<ID>`.
//!
//! Guaranteed pods sit directly under `kubepods[.slice]`; systemd spells the UID with `_` for `-`. The same layout
//! appears under the v1 memory hierarchy and the unified one, sometimes below a prefix (`kubelet.slice/…` in kind).
//! So the pod is searched by name a few levels deep rather than by a fixed path.

use crate::error::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};

/// How deep below the hierarchy root a pod directory may be (root/kubelet.slice/kubelet-kubepods.slice/
/// kubelet-kubepods-burstable.slice/pod is depth 4).
const MAX_POD_DEPTH: usize = 5;

/// The pod's cgroup directory below `root`.
pub fn find_pod(root: &Path, uid: &str) -> Result<PathBuf> {
    let uid = uid.trim();
    if uid.is_empty() || uid.contains('/') {
        return Err(Error::usage(format!("not a pod UID: {uid:?}")));
    }
    let dashed = uid.replace('_', "-");
    let underscored = uid.replace('-', "_");
    let cgroupfs = format!("pod{dashed}");
    let systemd = format!("-pod{underscored}.slice");
    let mut found = Vec::new();
    let mut level = vec![root.to_path_buf()];
    for _ in 0..MAX_POD_DEPTH {
        let mut next = Vec::new();
        for dir in &level {
            for child in subdirectories(dir)? {
                let name = child.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name == cgroupfs || name.ends_with(&systemd) {
                    found.push(child);
                } else {
                    next.push(child);
                }
            }
        }
        if !found.is_empty() {
            break;
        }
        level = next;
    }
    match found.len() {
        0 => Err(Error::new(
            ErrorKind::Usage,
            format!("no cgroup of pod {uid} (looked for {cgroupfs} and *{systemd}, {MAX_POD_DEPTH} levels deep)"),
        )
        .at_path(root)),
        1 => Ok(found.remove(0)),
        _ => Err(Error::new(ErrorKind::Usage, format!("pod {uid} matches several cgroups: {found:?}")).at_path(root)),
    }
}

/// The container's cgroup directory inside the pod's: `id` may be a full ID, a unique prefix of at least 4
/// characters, or a `containerd://…` / `cri-o://…` / `docker://…` ID as `kubectl get pod -o yaml` shows it.
pub fn find_container(pod: &Path, id: &str) -> Result<PathBuf> {
    let id = id.trim();
    let id = id.split_once("://").map_or(id, |(_, rest)| rest);
    if id.len() < 4 || id.contains('/') {
        return Err(Error::usage(format!("not a container ID (or a prefix of at least 4 characters): {id:?}")));
    }
    let mut matches = Vec::new();
    for child in subdirectories(pod)? {
        let name = child.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some(candidate) = container_id_of(name) else { continue };
        if candidate == id {
            return Ok(child);
        }
        if candidate.starts_with(id) {
            matches.push(child);
        }
    }
    match matches.len() {
        1 => Ok(matches.remove(0)),
        0 => Err(Error::new(ErrorKind::Usage, format!("no cgroup of container {id} in this pod")).at_path(pod)),
        _ => {
            Err(Error::new(ErrorKind::Usage, format!("container ID prefix {id} is ambiguous: {matches:?}"))
                .at_path(pod))
        }
    }
}

/// The container ID a container cgroup's directory name carries, `None` for other directories (crio's conmon
/// scope, systemd's own, files).
pub fn container_id_of(name: &str) -> Option<&str> {
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let base = name.strip_suffix(".scope").unwrap_or(name);
    let id = ["cri-containerd-", "crio-", "docker-"].iter().find_map(|p| base.strip_prefix(p)).unwrap_or(base);
    // Runtime IDs are 64 hex digits; cgroupfs directories are the bare ID.
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) && (id != base || !name.ends_with(".scope")))
        .then_some(id)
}

fn subdirectories(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing cgroups", e).at_path(dir))?;
    let mut dirs: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()).collect();
    dirs.sort();
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c2a3b-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
    const ID: &str = "3b9f0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b";

    /// Writes `dirs` (relative paths) under a fresh root.
    fn tree(dirs: &[String]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for d in dirs {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        root
    }

    fn layouts() -> Vec<(&'static str, String, String)> {
        let u = UID.replace('-', "_");
        vec![
            (
                "systemd containerd burstable",
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
                format!("cri-containerd-{ID}.scope"),
            ),
            (
                "systemd crio besteffort",
                format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"),
                format!("crio-{ID}.scope"),
            ),
            (
                "systemd docker guaranteed",
                format!("kubepods.slice/kubepods-pod{u}.slice"),
                format!("docker-{ID}.scope"),
            ),
            (
                "kind: systemd below kubelet.slice",
                format!(
                    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/\
                     kubelet-kubepods-burstable-pod{u}.slice"
                ),
                format!("cri-containerd-{ID}.scope"),
            ),
            ("cgroupfs containerd burstable", format!("kubepods/burstable/pod{UID}"), ID.to_string()),
            ("cgroupfs docker guaranteed", format!("kubepods/pod{UID}"), ID.to_string()),
            ("cgroupfs crio besteffort", format!("kubepods/besteffort/pod{UID}"), format!("crio-{ID}")),
        ]
    }

    #[test]
    fn every_driver_and_runtime_layout_is_found() {
        for (name, pod, container) in layouts() {
            // Neighbours: another pod, the sandbox's pause container, crio's conmon scope, systemd's own cgroups.
            let other_pod = pod.replace("6f1c", "0000");
            let dirs = vec![
                format!("{pod}/{container}"),
                format!("{pod}/{}", container.replace("3b9f", "aaaa")),
                format!("{pod}/crio-conmon-{ID}.scope"),
                format!("{other_pod}/{container}"),
                "system.slice/containerd.service".to_string(),
            ];
            let root = tree(&dirs);
            let found = find_pod(root.path(), UID).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(found, root.path().join(&pod), "{name}");
            for id in [ID, &ID[..12], &format!("containerd://{ID}"), &format!("cri-o://{ID}")] {
                let c = find_container(&found, id).unwrap_or_else(|e| panic!("{name} {id}: {e}"));
                assert_eq!(c, found.join(&container), "{name} {id}");
            }
        }
    }

    #[test]
    fn systemd_uids_may_be_given_either_way() {
        let u = UID.replace('-', "_");
        let root = tree(&[format!("kubepods.slice/kubepods-pod{u}.slice")]);
        assert!(find_pod(root.path(), &u).is_ok());
        assert!(find_pod(root.path(), UID).is_ok());
    }

    #[test]
    fn missing_ambiguous_and_malformed_are_errors() {
        let root = tree(&[
            format!("kubepods/burstable/pod{UID}/{ID}"),
            format!("kubepods/burstable/pod{UID}/3b9f{}", &ID[4..60]),
        ]);
        let pod = find_pod(root.path(), UID).unwrap();
        assert!(find_container(&pod, "3b9f").unwrap_err().to_string().contains("ambiguous"));
        assert_eq!(find_container(&pod, ID).unwrap(), pod.join(ID), "an exact match wins over prefixes");
        assert!(find_container(&pod, "ffffffff").unwrap_err().to_string().contains("no cgroup of container"));
        assert!(find_container(&pod, "ab").is_err());
        assert!(find_pod(root.path(), "0000").unwrap_err().to_string().contains("no cgroup of pod"));
        assert!(find_pod(root.path(), "../etc").is_err());
    }

    #[test]
    fn container_ids_from_directory_names() {
        assert_eq!(container_id_of(&format!("cri-containerd-{ID}.scope")), Some(ID));
        assert_eq!(container_id_of(&format!("crio-{ID}.scope")), Some(ID));
        assert_eq!(container_id_of(&format!("crio-{ID}")), Some(ID));
        assert_eq!(container_id_of(ID), Some(ID));
        assert_eq!(container_id_of(&format!("crio-conmon-{ID}.scope")), None);
        assert_eq!(container_id_of("init.scope"), None);
        assert_eq!(container_id_of("memory.stat"), None);
    }
}
