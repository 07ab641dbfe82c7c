//! Where the numbers come from: Prometheus's HTTP API ([`prometheus`]) or the proxies'
//! `/metrics` pages ([`scrape`]).

pub mod prometheus;
pub mod scrape;
