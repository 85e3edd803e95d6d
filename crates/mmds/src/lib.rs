//! The microVM metadata service (MMDS), as Firecracker has it: a JSON data store
//! the host fills through the API (`PUT`/`PATCH /mmds`), and the HTTP answers a
//! guest gets when it asks for it on the MMDS address (`GET /path`, and with V2
//! the session tokens of `PUT /latest/api/token`).
//!
//! This crate has no KVM and no network stack: the API and the net device share
//! one [`Mmds`] handle; the net device's TCP/IP stack hands each complete request
//! to [`Mmds::answer`] and sends back the bytes it returns.

mod config;
mod guest;
mod store;

pub use config::{MmdsConfig, MmdsConfigError, MmdsVersion, DEFAULT_IPV4};
pub use guest::{Request, MAX_REQUEST};
pub use store::{Mmds, StoreError, TOKEN_TTL_MAX};
