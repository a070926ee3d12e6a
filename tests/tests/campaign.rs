//! The fault campaign (`tests/src/campaign.rs`): a short run in every `cargo test`, a long
//! one on request:
//!
//! ```text
//! cargo test -p tether-tests --test campaign -- --ignored --nocapture
//! TETHER_CAMPAIGN_FAULTS=500 TETHER_CAMPAIGN_SEED=42 cargo test ... (the same, sized and replayed)
//! ```

use tether_tests::campaign::{CampaignSpec, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_fault_campaign_loses_nothing() {
    // Always 30 faults here; the seed may be given to replay a run.
    let seed = CampaignSpec::from_env(30).seed;
    run(CampaignSpec { faults: 30, seed }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run on request (see the file's comment)"]
async fn a_long_fault_campaign_loses_nothing() {
    run(CampaignSpec::from_env(300)).await;
}
