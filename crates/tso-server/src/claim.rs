//! One oracle per backend: two guards over one backend instance would both fence and both
//! serve the same epoch, granting the same timestamps. A guard claims its backend (by the
//! address of the shared instance) for as long as its state lives; a second claim is refused.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::backend::Backend;

static CLAIMED: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

/// A backend instance claimed by one oracle; released on drop.
#[derive(Debug)]
pub(crate) struct Claim(usize);

impl Claim {
    /// Claims `backend`, or `None` if another live oracle holds it.
    pub fn take(backend: &Arc<dyn Backend>) -> Option<Claim> {
        let key = Arc::as_ptr(backend) as *const () as usize;
        let fresh = CLAIMED.lock().expect("claims lock").insert(key);
        // Built only when won: a `Claim` dropped on the losing path would release the winner's.
        if fresh { Some(Claim(key)) } else { None }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        CLAIMED.lock().expect("claims lock").remove(&self.0);
    }
}
