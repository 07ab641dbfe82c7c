//! `sigil inspect route`: which route, rule, backends and filters a given request would take,
//! and why the others were not taken, computed by the agent's and the proxy's own code.
