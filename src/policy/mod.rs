//! Request policies, applied in a fixed order after routing (see DESIGN): flood protection per
//! client IP, authentication, then tenant quotas; the WAF joins here.

pub mod auth;
pub mod bot;
pub mod challenge;
pub mod client_ip;
pub mod flood;
pub mod ip_rules;
pub mod quota;
pub mod rules;
pub mod verify;
