//! Proxying over the edge link, the same code at both ends.
//!
//! - [`LinkRemote`] is the runtime's [`Remote`](crate::runtime::Remote): it turns a call for
//!   a module that does not run here into a request on the link to the side that runs it.
//!   Each server says which link that is through [`Links`].
//! - [`serve_call`] answers those requests when they arrive, through the local runtime,
//!   naming the link they came in on so that they are never sent back over it.
//! - [`errors`] maps errors between the runtime, the link and the wire, losslessly, so a
//!   client sees the same error code whether or not its call crossed a link.

pub mod errors;
mod remote;
mod serve;

pub use remote::{LinkRemote, Links};
pub use serve::serve_call;
