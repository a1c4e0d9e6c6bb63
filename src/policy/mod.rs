//! Request policies, applied in a fixed order after routing (see DESIGN): authentication now;
//! quotas, flood protection and the WAF join here.

pub mod auth;
