//! Finding the pod (and container) a process runs in from its `/proc/<pid>/cgroup`: pure parsing
//! of the paths the kubelet's cgroupfs and systemd drivers create, under cgroup v1 (a line per
//! controller hierarchy, `N:controllers:/path`) and v2 (`0::/path`), with containerd, CRI-O and
//! Docker container cgroups, and nested under kind / k3s / Docker-in-Docker prefixes.
//!
//! The layout is `<prefix>/kubepods[/<qos>]/pod<uid>/<container>[/<anything>]` with cgroupfs,
//! and `<prefix>/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`
//! with systemd. Two rules keep a process from choosing its pod by creating cgroups where it may:
//! - the *first* pod segment counts: a container allowed to create sub-cgroups can only add
//!   segments below its own pod's;
//! - a pod segment counts only under a `kubepods` hierarchy and never under `user.slice`, where
//!   systemd delegates subtrees to unprivileged users (so rootless Kubernetes is not supported).

/// The pod, and container if the path names one, of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRef {
    /// The pod's `metadata.uid`, with dashes (systemd slices spell it with underscores).
    pub pod_uid: String,
    /// The 64-hex-digit container ID, if the process is in a container's cgroup.
    pub container_id: Option<String>,
}

/// The pod the process is in, or `None` if no line names one or lines disagree about it.
pub fn parse_cgroup(contents: &str) -> Option<ContainerRef> {
    let mut found: Option<ContainerRef> = None;
    for line in contents.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let Some(this) = parse_path(path) else {
            continue;
        };
        let Some(seen) = found.as_mut() else {
            found = Some(this);
            continue;
        };
        // Under cgroup v1 every hierarchy should agree; if they do not, nothing can be trusted.
        if seen.pod_uid != this.pod_uid {
            return None;
        }
        match (&seen.container_id, this.container_id) {
            (_, None) => {}
            (None, Some(id)) => seen.container_id = Some(id),
            (Some(seen_id), Some(id)) if *seen_id == id => {}
            (Some(_), Some(_)) => return None,
        }
    }
    found
}

fn parse_path(path: &str) -> Option<ContainerRef> {
    let mut segments = path.split('/').filter(|s| !s.is_empty()).peekable();
    // A reader in its own cgroup namespace (a containerized agent on cgroup v2) sees other
    // processes' paths relative to its namespace root: "/../../kubepods-...". The elided prefix
    // is the agent's own pod hierarchy, so such a path is taken as under kubepods.
    let mut under_kubepods = segments.peek() == Some(&"..");
    while let Some(segment) = segments.next() {
        if segment == "user.slice" {
            return None;
        }
        if let Some(pod_uid) = pod_uid(segment) {
            if !(under_kubepods || segment.contains("kubepods")) {
                return None;
            }
            return Some(ContainerRef {
                pod_uid,
                container_id: segments.next().and_then(container_id),
            });
        }
        under_kubepods |= segment.contains("kubepods");
    }
    None
}

/// The pod UID in a pod segment: `pod<uid>` (cgroupfs) or `…-pod<uid_with_underscores>.slice`
/// (systemd, e.g. `kubepods-besteffort-pod…`, `kubelet-kubepods-pod…`).
fn pod_uid(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let uid = name
        .strip_prefix("pod")
        .or_else(|| name.rsplit_once("-pod").map(|(_, uid)| uid))?;
    let bytes = uid.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let separator = bytes[8];
    if separator != b'-' && separator != b'_' {
        return None;
    }
    let well_formed = bytes.iter().enumerate().all(|(i, &c)| match i {
        8 | 13 | 18 | 23 => c == separator,
        _ => c.is_ascii_hexdigit(),
    });
    well_formed.then(|| uid.replace('_', "-"))
}

/// The container ID in a container segment: the bare ID (cgroupfs) or `<runtime>-<id>.scope`
/// (systemd: `cri-containerd-`, `crio-`, `crio-conmon-`, `docker-`).
fn container_id(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = name.rsplit('-').next()?;
    (id.len() == 64 && id.bytes().all(|c| c.is_ascii_hexdigit())).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    fn found(pod_uid: &str, container_id: Option<&str>) -> Option<ContainerRef> {
        Some(ContainerRef {
            pod_uid: pod_uid.into(),
            container_id: container_id.map(Into::into),
        })
    }

    #[test]
    fn cgroup_v1_cgroupfs_driver_docker() {
        // SPIRE's k8s workload attestor test data (cgroups_pid_in_pod.txt), Kubernetes 1.8 era.
        let contents = format!(
            "11:hugetlb:/kubepods/burstable/pod{POD}/{CID}\n\
             10:devices:/kubepods/burstable/pod{POD}/{CID}\n\
             9:pids:/kubepods/burstable/pod{POD}/{CID}\n\
             8:perf_event:/kubepods/burstable/pod{POD}/{CID}\n\
             7:net_cls,net_prio:/kubepods/burstable/pod{POD}/{CID}\n\
             6:cpuset:/kubepods/burstable/pod{POD}/{CID}\n\
             5:memory:/kubepods/burstable/pod{POD}/{CID}\n\
             4:cpu,cpuacct:/kubepods/burstable/pod{POD}/{CID}\n\
             3:freezer:/kubepods/burstable/pod{POD}/{CID}\n\
             2:blkio:/kubepods/burstable/pod{POD}/{CID}\n\
             1:name=systemd:/kubepods/burstable/pod{POD}/{CID}\n"
        );
        assert_eq!(parse_cgroup(&contents), found(POD, Some(CID)));
    }

    #[test]
    fn cgroup_v1_systemd_driver_docker() {
        let slice = POD.replace('-', "_");
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice}.slice/docker-{CID}.scope"
        );
        let contents = format!("12:memory:{path}\n4:cpu,cpuacct:{path}\n1:name=systemd:{path}\n");
        assert_eq!(parse_cgroup(&contents), found(POD, Some(CID)));
    }

    #[test]
    fn cgroup_v2_systemd_driver_containerd_all_qos_classes() {
        let pod = "8d1f0c2e-41a4-4e5e-9b5d-0f7a8d3c1b2a";
        let slice = pod.replace('-', "_");
        for path in [
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice}.slice/cri-containerd-{CID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{slice}.slice/cri-containerd-{CID}.scope"
            ),
            // Guaranteed pods sit directly under kubepods.slice.
            format!("/kubepods.slice/kubepods-pod{slice}.slice/cri-containerd-{CID}.scope"),
        ] {
            assert_eq!(
                parse_cgroup(&format!("0::{path}\n")),
                found(pod, Some(CID)),
                "{path}"
            );
        }
    }

    #[test]
    fn cgroup_v2_systemd_driver_cri_o_workload_and_conmon() {
        let slice = POD.replace('-', "_");
        let base = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{slice}.slice"
        );
        assert_eq!(
            parse_cgroup(&format!("{base}/crio-{CID}.scope\n")),
            found(POD, Some(CID))
        );
        // CRI-O may nest the workload one level further down ("container" sub-cgroup).
        assert_eq!(
            parse_cgroup(&format!("{base}/crio-{CID}.scope/container\n")),
            found(POD, Some(CID))
        );
        assert_eq!(
            parse_cgroup(&format!("{base}/crio-conmon-{CID}.scope\n")),
            found(POD, Some(CID))
        );
    }

    #[test]
    fn cgroupfs_driver_guaranteed_and_besteffort_and_cgroup_v2() {
        for path in [
            format!("/kubepods/pod{POD}/{CID}"),
            format!("/kubepods/besteffort/pod{POD}/{CID}"),
        ] {
            assert_eq!(
                parse_cgroup(&format!("4:memory:{path}\n")),
                found(POD, Some(CID))
            );
            // k3s on a cgroup v2 host with the cgroupfs driver.
            assert_eq!(parse_cgroup(&format!("0::{path}\n")), found(POD, Some(CID)));
        }
    }

    #[test]
    fn kind_node_in_docker_cgroup_v1() {
        let node = "c87ba45a5d4cb8a71e2e3e0d5f7d4ce9e0d1a3f4d5e6f708192a3b4c5d6e7f80";
        let contents = format!(
            "12:pids:/docker/{node}/kubepods/besteffort/pod{POD}/{CID}\n\
             1:name=systemd:/docker/{node}/kubepods/besteffort/pod{POD}/{CID}\n\
             0::/system.slice/containerd.service\n"
        );
        assert_eq!(parse_cgroup(&contents), found(POD, Some(CID)));
    }

    #[test]
    fn kind_node_cgroup_v2_kubelet_slice() {
        let slice = POD.replace('-', "_");
        let contents = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{slice}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(parse_cgroup(&contents), found(POD, Some(CID)));
    }

    #[test]
    fn path_relative_to_the_readers_cgroup_namespace() {
        let slice = POD.replace('-', "_");
        let contents =
            format!("0::/../../kubepods-besteffort-pod{slice}.slice/cri-containerd-{CID}.scope\n");
        assert_eq!(parse_cgroup(&contents), found(POD, Some(CID)));
        let contents = format!("0::/../../pod{POD}/{CID}\n");
        assert_eq!(parse_cgroup(&contents), found(POD, Some(CID)));
    }

    #[test]
    fn pod_sandbox_and_pod_level_cgroups() {
        // The pause container is a container of the pod like any other.
        let pause = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/burstable/pod{POD}/{pause}\n")),
            found(POD, Some(pause))
        );
        // A process in the pod's own cgroup, or in a non-ID child, names the pod only.
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/burstable/pod{POD}\n")),
            found(POD, None)
        );
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/burstable/pod{POD}/not-an-id\n")),
            found(POD, None)
        );
    }

    #[test]
    fn a_sub_cgroup_cannot_claim_another_pod() {
        // A container that may create cgroups below its own names some other pod underneath.
        let other = "11111111-2222-3333-4444-555555555555";
        let contents = format!("0::/kubepods/burstable/pod{POD}/{CID}/kubepods/pod{other}/{CID}\n");
        assert_eq!(parse_cgroup(&contents), found(POD, Some(CID)));
    }

    #[test]
    fn host_processes_name_no_pod() {
        for contents in [
            "0::/init.scope\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "0::/system.slice/containerd.service\n",
            "0::/\n",
            // A plain Docker container, not Kubernetes.
            "0::/system.slice/docker-9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961.scope\n",
            "12:pids:/user.slice/user-1000.slice\n1:name=systemd:/user.slice/user-1000.slice/session-3.scope\n",
        ] {
            assert_eq!(parse_cgroup(contents), None, "{contents}");
        }
    }

    #[test]
    fn a_user_delegated_subtree_cannot_fake_a_pod() {
        let contents = format!(
            "0::/user.slice/user-1000.slice/user@1000.service/kubepods/burstable/pod{POD}/{CID}\n"
        );
        assert_eq!(parse_cgroup(&contents), None);
        // A pod-shaped name outside any kubepods hierarchy does not count either.
        assert_eq!(
            parse_cgroup(&format!("0::/system.slice/pod{POD}/{CID}\n")),
            None
        );
    }

    #[test]
    fn garbage_and_malformed_uids_name_no_pod() {
        for contents in [
            "".to_string(),
            "garbage\n".to_string(),
            "\u{0}\u{1}::::\n".to_string(),
            // Truncated UID, wrong group lengths, mixed separators, non-hex.
            "0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350-02096814779/x\n".to_string(),
            "0::/kubepods/burstable/pod2c48913cb-29f-11e7-9350-020968147796/x\n".to_string(),
            "0::/kubepods.slice/kubepods-pod2c48913c_b29f-11e7_9350_020968147796.slice/x\n"
                .to_string(),
            "0::/kubepods/burstable/podzc48913c-b29f-11e7-9350-020968147796/x\n".to_string(),
        ] {
            assert_eq!(parse_cgroup(&contents), None, "{contents:?}");
        }
    }

    #[test]
    fn hierarchies_that_disagree_are_refused() {
        let other = "11111111-2222-3333-4444-555555555555";
        let contents = format!(
            "5:memory:/kubepods/burstable/pod{POD}/{CID}\n1:name=systemd:/kubepods/burstable/pod{other}/{CID}\n"
        );
        assert_eq!(parse_cgroup(&contents), None);
        let other_cid = "0".repeat(64);
        let contents = format!(
            "5:memory:/kubepods/burstable/pod{POD}/{CID}\n1:name=systemd:/kubepods/burstable/pod{POD}/{other_cid}\n"
        );
        assert_eq!(parse_cgroup(&contents), None);
        // One hierarchy at the pod level, another at the container: the container is known.
        let contents = format!(
            "5:memory:/kubepods/burstable/pod{POD}\n1:name=systemd:/kubepods/burstable/pod{POD}/{CID}\n"
        );
        assert_eq!(parse_cgroup(&contents), found(POD, Some(CID)));
    }
}
