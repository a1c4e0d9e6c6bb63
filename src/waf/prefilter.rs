//! Rule prefiltering: one regex set per target list, run once per distinct transformed value,
//! tells which rules' first `@rx` or `@pm` can match at all, so the others are skipped
//! without walking their targets.
//!
//! CRS repeats the same target list (`REQUEST_COOKIES|REQUEST_COOKIES_NAMES|ARGS_NAMES|ARGS|
//! XML:/*`) over dozens of rules, each with its own large pattern and one of some twenty
//! transformation chains. A benign value matches none of them, and most chains leave it as
//! it is: the group's set runs once per distinct value the chains produce, where evaluating
//! the rules one by one ran every pattern on every value.
//!
//! The prefilter is exact in one direction only: a rule it rules out cannot match (its first
//! link would have had to match one of the values the set saw, through the same chain, with
//! the same pattern); a rule it lets through runs as before, with its captures, exclusions
//! and effects. Exclusions only remove values, so the set, run without them, sees a superset.

use regex::bytes::{RegexSet, RegexSetBuilder};

use super::compile::{Rule, Target};
use super::operator::{Kind, Rx};
use super::request::Var;

/// The prefilter of a ruleset.
#[derive(Debug, Default)]
pub struct Prefilter {
    pub groups: Vec<Group>,
    /// Per rule index: its group, if any.
    pub of_rule: Vec<Option<u16>>,
}

/// Rules whose first link reads the same targets.
#[derive(Debug)]
pub struct Group {
    pub targets: Vec<Target>,
    /// The chains the patterns read values through (every stage of a `multiMatch` chain);
    /// at most 64.
    pub chains: Vec<u16>,
    pub set: RegexSet,
    /// Per pattern of `set`: its rule index, and which of `chains` it applies to (bit mask).
    pub patterns: Vec<(u32, u64)>,
}

/// The pattern of a rule's first link, when it can be prefiltered: an `@rx`, or a `@pm` as
/// an alternation of its phrases, on request values (not TX or MATCHED_VARS, which change
/// while rules run), not negated, not counted.
fn prefilterable(rule: &Rule) -> Option<String> {
    let link = rule.links.first()?;
    let pattern = match &link.op.kind {
        Kind::Rx(Rx::Bytes(re)) => re.as_str().to_string(),
        // Phrases compare without ASCII case, which `(?i)` without Unicode does too.
        Kind::Pm(_, phrases) if phrases.iter().all(|p| p.is_ascii()) => {
            let alternatives: Vec<String> = phrases.iter().map(|p| regex::escape(p)).collect();
            format!("(?i:{})", alternatives.join("|"))
        }
        _ => return None,
    };
    let dynamic = |v: Var| {
        matches!(
            v,
            Var::Tx
                | Var::MatchedVar
                | Var::MatchedVarName
                | Var::MatchedVars
                | Var::MatchedVarsNames
        )
    };
    let plain = !link.op.negated
        && !link.targets.is_empty()
        && link.targets.iter().all(|t| !t.count && !dynamic(t.var));
    plain.then_some(pattern)
}

/// Groups the rules that can be prefiltered. A pattern that matches the empty string would
/// let its rule through on every value, and is left out. A set that fails to build (too
/// large) leaves its rules unfiltered: they run one by one.
pub fn build(rules: &[Rule], chain_stages: &[Vec<u16>]) -> Prefilter {
    struct Draft {
        key: String,
        chains: Vec<u16>,
        members: Vec<(u32, u64, String)>,
    }
    let mut drafts: Vec<Draft> = Vec::new();
    for (ri, rule) in rules.iter().enumerate() {
        let Some(pattern) = prefilterable(rule) else {
            continue;
        };
        if Rx::compile(&pattern).is_ok_and(|(rx, _)| rx.is_match(b"")) {
            continue;
        }
        let link = &rule.links[0];
        let key = format!("{:?}", link.targets);
        let d = match drafts.iter().position(|d| d.key == key) {
            Some(d) => d,
            None => {
                drafts.push(Draft {
                    key,
                    chains: Vec::new(),
                    members: Vec::new(),
                });
                drafts.len() - 1
            }
        };
        let d = &mut drafts[d];
        let stages = match link.multi_match {
            true => &chain_stages[link.chain as usize][..],
            false => std::slice::from_ref(&link.chain),
        };
        let mut mask = 0u64;
        let mut chains = d.chains.clone();
        for c in stages {
            let k = match chains.iter().position(|x| x == c) {
                Some(k) => k,
                None => {
                    chains.push(*c);
                    chains.len() - 1
                }
            };
            mask |= 1 << k.min(63);
        }
        if chains.len() > 64 {
            continue;
        }
        d.chains = chains;
        d.members.push((ri as u32, mask, pattern));
    }
    let mut pf = Prefilter {
        groups: Vec::new(),
        of_rule: vec![None; rules.len()],
    };
    for d in drafts {
        let built = RegexSetBuilder::new(d.members.iter().map(|(_, _, p)| p))
            .unicode(false)
            .dot_matches_new_line(true)
            .multi_line(true)
            .size_limit(256 << 20)
            .dfa_size_limit(32 << 20)
            .build();
        let Ok(set) = built else {
            continue;
        };
        let g = pf.groups.len() as u16;
        for (ri, _, _) in &d.members {
            pf.of_rule[*ri as usize] = Some(g);
        }
        pf.groups.push(Group {
            targets: rules[d.members[0].0 as usize].links[0].targets.clone(),
            chains: d.chains,
            set,
            patterns: d.members.iter().map(|(ri, m, _)| (*ri, *m)).collect(),
        });
    }
    pf
}
