//! Who may do what: the second gate, after the socket's own permissions.
//!
//! Every connection's credentials are read from the kernel at accept: uid, gid and pid
//! (`SO_PEERCRED`) and the supplementary groups the client process had (`SO_PEERGROUPS`), so
//! membership is what the client really holds, not what `/etc/group` says now. Root and members
//! of the admin groups may do everything; members of the build groups may build and see, follow
//! and cancel their own builds; anyone else may only ask for versions and plugins. A group that
//! does not exist matches nobody: the policy fails closed.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, BorrowedFd};

use amidala::proto::{ErrorCode, NETWORKS};
use serde::Deserialize;

use crate::error::Failure;

/// The `[policy]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Groups whose members may build.
    pub build_groups: Vec<String>,
    /// Groups whose members may see and cancel every build (root always may).
    pub admin_groups: Vec<String>,
    /// The network of a build that asks for none.
    pub default_network: String,
    /// The networks members of the build groups may ask for (admins may use any).
    pub networks: Vec<String>,
    /// Give builds `CAP_NET_RAW` and packet sockets (ping, capturing): with the host's
    /// network they see every user's traffic on it. Never with `no-metadata`.
    pub net_raw: bool,
    /// Let provisioners make user namespaces of their own.
    pub user_namespaces: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            build_groups: vec!["amidala".into()],
            admin_groups: vec!["amidala-admin".into()],
            // The host's network without the instance metadata service: no build reaches the
            // builder's IAM role unless an admin asks for the host's network.
            default_network: "no-metadata".into(),
            networks: vec!["no-metadata".into(), "none".into()],
            net_raw: false,
            user_namespaces: false,
        }
    }
}

impl PolicyConfig {
    /// Checks the network keys name networks that exist.
    pub fn validate(&self) -> Result<(), String> {
        for network in self.networks.iter().chain([&self.default_network]) {
            if !NETWORKS.contains(&network.as_str()) {
                return Err(format!(
                    "policy: network {network:?} is not one of {}",
                    NETWORKS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups, as the client process held them when it connected.
    pub groups: Vec<u32>,
}

const SO_PEERGROUPS: libc::c_int = 59;

/// The supplementary groups of the process at the other end of a Unix socket.
pub fn peer_groups(socket: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is valid for writes of `len` bytes; the kernel writes at most that
        // and reports the size it wrote (or needs, with ERANGE) in `len`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65536 {
            groups.resize(count, 0);
            continue;
        }
        return Err(err);
    }
}

/// What a peer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Root or an admin group: everything.
    Admin,
    /// A build group: builds, and its own builds.
    Builder,
    /// Neither: versions and plugins only.
    Outsider,
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Build,
    Import,
    ListBuilds,
    /// Status or logs of a build owned by `owner`.
    ReadBuild {
        owner: u32,
    },
    CancelBuild {
        owner: u32,
    },
    ListImages,
    Describe,
    /// Collecting what builds left behind (admins only).
    Gc,
    /// Publishing a snapshot for everyone's builds, or taking it back (admins only).
    Publish,
    /// Deleting and exporting images and snapshots (their owners', checked once found).
    ManageImages,
}

impl Action {
    fn what(self) -> &'static str {
        match self {
            Action::Build => "building",
            Action::Import => "importing a base snapshot",
            Action::ListBuilds => "listing builds",
            Action::ReadBuild { .. } => "reading another user's build",
            Action::CancelBuild { .. } => "cancelling another user's build",
            Action::ListImages => "listing images and snapshots",
            Action::Describe => "asking for versions and plugins",
            Action::Gc => "collecting garbage",
            Action::Publish => "publishing a snapshot",
            Action::ManageImages => "deleting or exporting images and snapshots",
        }
    }
}

/// The policy in force, with group names resolved to ids.
#[derive(Debug, Clone)]
pub struct Policy {
    config: PolicyConfig,
    build_gids: BTreeSet<u32>,
    admin_gids: BTreeSet<u32>,
}

impl Policy {
    /// Resolves the group names; a missing group is logged and matches nobody.
    pub fn new(config: PolicyConfig) -> Policy {
        let resolve = |names: &[String]| -> BTreeSet<u32> {
            names
                .iter()
                .filter_map(|name| match nix::unistd::Group::from_name(name) {
                    Ok(Some(group)) => Some(group.gid.as_raw()),
                    _ => {
                        tracing::warn!(group = %name, "policy group does not exist: it grants nothing");
                        None
                    }
                })
                .collect()
        };
        Policy {
            build_gids: resolve(&config.build_groups),
            admin_gids: resolve(&config.admin_groups),
            config,
        }
    }

    /// A policy over given group ids (for tests).
    pub fn with_gids(build: &[u32], admin: &[u32]) -> Policy {
        Policy {
            config: PolicyConfig::default(),
            build_gids: build.iter().copied().collect(),
            admin_gids: admin.iter().copied().collect(),
        }
    }

    pub fn role(&self, peer: &Peer) -> Role {
        let member = |gids: &BTreeSet<u32>| {
            gids.contains(&peer.gid) || peer.groups.iter().any(|g| gids.contains(g))
        };
        if peer.uid == 0 || member(&self.admin_gids) {
            Role::Admin
        } else if member(&self.build_gids) {
            Role::Builder
        } else {
            Role::Outsider
        }
    }

    /// Whether `peer` may see a build of `owner` (in listings).
    pub fn sees(&self, peer: &Peer, owner: u32) -> bool {
        match self.role(peer) {
            Role::Admin => true,
            Role::Builder => peer.uid == owner,
            Role::Outsider => false,
        }
    }

    /// Allows `action`, or says what was refused and why (and logs it, with uid and pid).
    pub fn authorize(&self, peer: &Peer, action: Action) -> Result<(), Failure> {
        let role = self.role(peer);
        let allowed = match (role, action) {
            (Role::Admin, _) => true,
            (_, Action::Describe) => true,
            (Role::Builder, Action::ReadBuild { owner } | Action::CancelBuild { owner }) => {
                owner == peer.uid
            }
            (Role::Builder, Action::Gc | Action::Publish) => false,
            (Role::Builder, _) => true,
            (Role::Outsider, _) => false,
        };
        if allowed {
            return Ok(());
        }
        let why = match (role, action) {
            (Role::Builder, Action::ReadBuild { owner } | Action::CancelBuild { owner }) => {
                format!(
                    "the build belongs to uid {owner}; only its owner and admins ({}) may",
                    self.admins()
                )
            }
            (Role::Builder, Action::Gc | Action::Publish) => {
                format!("only admins ({}) may", self.admins())
            }
            _ => format!(
                "you are in none of the groups that may ({})",
                self.config.build_groups.join(", ")
            ),
        };
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, action = action.what(), "refused: {why}");
        Err(Failure::new(
            ErrorCode::PermissionDenied,
            format!("{} refused: {why}", action.what()),
        ))
    }

    /// Whose snapshots `peer`'s lookups see (see [`crate::provider::Viewer`]).
    pub fn viewer(&self, peer: &Peer) -> crate::provider::Viewer {
        crate::provider::Viewer {
            uid: Some(peer.uid),
            admin: self.role(peer) == Role::Admin,
        }
    }

    /// The network a build of `peer` gets when it asks for `requested`: the default if it
    /// asks for none; refused if the policy does not let the peer use it.
    pub fn network(&self, peer: &Peer, requested: Option<&str>) -> Result<String, Failure> {
        let network = requested.unwrap_or(&self.config.default_network);
        if self.role(peer) == Role::Admin || self.config.networks.iter().any(|n| n == network) {
            return Ok(network.to_owned());
        }
        let why = format!(
            "builds may use only {} here (policy.networks); admins ({}) may use any",
            self.config.networks.join(", "),
            self.admins()
        );
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, network, "refused: {why}");
        Err(Failure::new(
            ErrorCode::PermissionDenied,
            format!("--network {network} refused: {why}"),
        ))
    }

    fn admins(&self) -> String {
        let mut names = vec!["root".to_owned()];
        names.extend(self.config.admin_groups.iter().cloned());
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            pid: Some(1),
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn networks_follow_the_policy() {
        let mut policy = Policy::with_gids(&[100], &[200]);
        let member = peer(1003, 1003, &[100]);
        let admin = peer(1001, 1001, &[200]);
        // By default, no build gets the metadata service unless an admin asks for it.
        assert_eq!(policy.network(&member, None).unwrap(), "no-metadata");
        assert!(policy.network(&member, Some("host")).is_err());
        policy.config.default_network = "host".into();
        policy.config.networks = vec!["host".into()];
        assert_eq!(policy.network(&member, None).unwrap(), "host");
        policy.config.default_network = "no-metadata".into();
        policy.config.networks = vec!["no-metadata".into(), "none".into()];
        assert_eq!(policy.network(&member, None).unwrap(), "no-metadata");
        assert_eq!(policy.network(&member, Some("none")).unwrap(), "none");
        let refused = policy.network(&member, Some("host")).unwrap_err();
        assert_eq!(refused.code, ErrorCode::PermissionDenied);
        assert!(
            refused.message.contains("only no-metadata, none"),
            "{}",
            refused.message
        );
        assert_eq!(policy.network(&admin, Some("host")).unwrap(), "host");
        assert!(policy.config.validate().is_ok());
        policy.config.networks.push("bridge".into());
        assert!(policy.config.validate().unwrap_err().contains("\"bridge\""));
    }

    #[test]
    fn the_permission_matrix() {
        let policy = Policy::with_gids(&[100], &[200]);
        let root = peer(0, 0, &[]);
        let admin = peer(1001, 1001, &[200]);
        let member = peer(1002, 1002, &[100]);
        let primary_member = peer(1003, 100, &[]);
        let outsider = peer(1004, 1004, &[300]);
        assert_eq!(policy.role(&root), Role::Admin);
        assert_eq!(policy.role(&admin), Role::Admin);
        assert_eq!(policy.role(&member), Role::Builder, "supplementary group");
        assert_eq!(policy.role(&primary_member), Role::Builder, "primary group");
        assert_eq!(policy.role(&outsider), Role::Outsider);

        let own = Action::ReadBuild { owner: 1002 };
        let others = Action::CancelBuild { owner: 1003 };
        for (who, action, allowed) in [
            (&root, others, true),
            (&admin, others, true),
            (&admin, Action::Build, true),
            (&member, Action::Build, true),
            (&member, Action::Import, true),
            (&member, own, true),
            (&member, Action::CancelBuild { owner: 1002 }, true),
            (&member, others, false),
            (&member, Action::ReadBuild { owner: 1003 }, false),
            (&outsider, Action::Build, false),
            (&outsider, Action::ListBuilds, false),
            (&outsider, Action::ListImages, false),
            (&outsider, Action::ReadBuild { owner: 1004 }, false),
            (&outsider, Action::Describe, true),
            (&root, Action::Gc, true),
            (&admin, Action::Gc, true),
            (&member, Action::Gc, false),
            (&outsider, Action::Gc, false),
            (&admin, Action::Publish, true),
            (&member, Action::Publish, false),
            (&member, Action::ManageImages, true),
            (&outsider, Action::ManageImages, false),
        ] {
            assert_eq!(
                policy.authorize(who, action).is_ok(),
                allowed,
                "{who:?} {action:?}"
            );
        }
        let refusal = policy.authorize(&member, others).unwrap_err();
        assert_eq!(refusal.code, ErrorCode::PermissionDenied);
        assert!(
            refusal.message.contains("belongs to uid 1003"),
            "{}",
            refusal.message
        );
        assert!(
            policy.sees(&member, 1002) && !policy.sees(&member, 1003) && policy.sees(&admin, 1003)
        );
        assert!(!policy.sees(&outsider, 1004));
    }

    #[test]
    fn missing_groups_grant_nothing() {
        let policy = Policy::new(PolicyConfig {
            build_groups: vec!["amidala-no-such-group-for-tests".into()],
            admin_groups: vec![],
            ..PolicyConfig::default()
        });
        assert_eq!(policy.role(&peer(1002, 1002, &[1002])), Role::Outsider);
        assert_eq!(policy.role(&peer(0, 0, &[])), Role::Admin, "root always");
    }

    #[test]
    fn peer_groups_come_from_the_kernel() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        let groups = peer_groups(a.as_fd()).unwrap();
        let mut ours: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = groups.clone();
        ours.sort();
        got.sort();
        assert_eq!(got, ours);
    }
}
