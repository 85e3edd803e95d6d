//! `PUT /mmds/config` and the `mmds-config` key of a configuration file.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The address the guest reaches MMDS on unless configured otherwise.
pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Which protocol the guest speaks to MMDS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Plain `GET`s; session tokens are accepted, not required.
    #[default]
    V1,
    /// Every `GET` carries a session token from `PUT /latest/api/token`.
    V2,
}

fn default_ipv4() -> Ipv4Addr {
    DEFAULT_IPV4
}

/// Firecracker's `MmdsConfig` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    /// Ids of the network interfaces whose guest frames reach MMDS.
    pub network_interfaces: Vec<String>,
    #[serde(default = "default_ipv4")]
    pub ipv4_address: Ipv4Addr,
    /// Answer text (IMDS format) whatever the `Accept` header says.
    #[serde(default)]
    pub imds_compat: bool,
}

/// A configuration MMDS cannot take, naming the field and the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MmdsConfigError {
    #[error("network_interfaces []: name at least one network interface")]
    NoInterfaces,
    #[error("network_interfaces {0:?}: the VM has no network interface with this id (PUT /network-interfaces/{{id}} first)")]
    UnknownInterface(String),
    #[error("network_interfaces {0:?}: named twice")]
    DuplicateInterface(String),
    #[error("ipv4_address {0}: not a link-local address (169.254.0.0/16, not its network or broadcast address)")]
    NotLinkLocal(Ipv4Addr),
}

impl MmdsConfig {
    /// Checks the body against the ids of the VM's network interfaces.
    pub fn validate<'a>(
        &self,
        interfaces: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Result<(), MmdsConfigError> {
        if self.network_interfaces.is_empty() {
            return Err(MmdsConfigError::NoInterfaces);
        }
        for (i, id) in self.network_interfaces.iter().enumerate() {
            if self.network_interfaces[..i].contains(id) {
                return Err(MmdsConfigError::DuplicateInterface(id.clone()));
            }
            if !interfaces.clone().into_iter().any(|known| known == id) {
                return Err(MmdsConfigError::UnknownInterface(id.clone()));
            }
        }
        let [a, b, c, d] = self.ipv4_address.octets();
        let edge = (c, d) == (0, 0) || (c, d) == (255, 255);
        if (a, b) != (169, 254) || edge {
            return Err(MmdsConfigError::NotLinkLocal(self.ipv4_address));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> MmdsConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_are_firecrackers() {
        let c = config(r#"{"network_interfaces": ["eth0"]}"#);
        assert_eq!(c.version, MmdsVersion::V1);
        assert_eq!(c.ipv4_address, DEFAULT_IPV4);
        assert!(!c.imds_compat);
        c.validate(["eth0"]).unwrap();
    }

    #[test]
    fn refusals_name_the_field_and_value() {
        let e = |json: &str| config(json).validate(["eth0"]).unwrap_err().to_string();
        assert!(e(r#"{"network_interfaces": []}"#).starts_with("network_interfaces []"));
        assert!(e(r#"{"network_interfaces": ["eth1"]}"#).starts_with("network_interfaces \"eth1\""));
        assert!(e(r#"{"network_interfaces": ["eth0", "eth0"]}"#).contains("twice"));
        let far = e(r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#);
        assert!(
            far.starts_with("ipv4_address 10.0.0.1: not a link-local"),
            "{far}"
        );
        assert!(serde_json::from_str::<MmdsConfig>(
            r#"{"network_interfaces": [], "version": "V3"}"#
        )
        .is_err());
    }
}
