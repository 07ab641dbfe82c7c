//! Kubernetes name and label syntax (apimachinery `validation`): object names (RFC 1123
//! subdomains and labels), label keys (qualified names) and label values. Each check returns the
//! message the API server uses, so `Invalid` Status objects read like the real ones.

const DNS1123_LABEL_MAX: usize = 63;
const DNS1123_SUBDOMAIN_MAX: usize = 253;
const QUALIFIED_NAME_MAX: usize = 63;
const LABEL_VALUE_MAX: usize = 63;

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= DNS1123_LABEL_MAX
        && s.chars().all(|c| is_lower_alnum(c) || c == '-')
        && s.starts_with(is_lower_alnum)
        && s.ends_with(is_lower_alnum)
}

/// An RFC 1123 label: the name rule for namespaces.
pub fn check_dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > DNS1123_LABEL_MAX {
        return Err(format!(
            "must be no more than {DNS1123_LABEL_MAX} characters"
        ));
    }
    if is_dns1123_label(s) {
        Ok(())
    } else {
        Err("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
             and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', \
             regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
            .into())
    }
}

/// An RFC 1123 subdomain: the name rule for most kinds (pods, secrets, configmaps, ...).
pub fn check_dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > DNS1123_SUBDOMAIN_MAX {
        return Err(format!(
            "must be no more than {DNS1123_SUBDOMAIN_MAX} characters"
        ));
    }
    // Each dot-separated part follows the label alphabet; only the total length is bounded.
    let valid = !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.chars().all(|c| is_lower_alnum(c) || c == '-')
                && part.starts_with(is_lower_alnum)
                && part.ends_with(is_lower_alnum)
        });
    if valid {
        Ok(())
    } else {
        Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
             and must start and end with an alphanumeric character (e.g. 'example.com', regex used for \
             validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
            .into())
    }
}

fn is_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A qualified name (`prefix/name` or `name`): the rule for label and annotation keys.
pub fn check_qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Err("prefix part must be non-empty".into());
        }
        check_dns1123_subdomain(prefix).map_err(|e| format!("prefix part {e}"))?;
    }
    if name.len() > QUALIFIED_NAME_MAX {
        return Err(format!(
            "name part must be no more than {QUALIFIED_NAME_MAX} characters"
        ));
    }
    if is_name_part(name) {
        Ok(())
    } else {
        Err("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end \
             with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for \
             validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
            .into())
    }
}

/// A label value: empty, or up to 63 name characters.
pub fn check_label_value(s: &str) -> Result<(), String> {
    if s.len() > LABEL_VALUE_MAX {
        return Err(format!("must be no more than {LABEL_VALUE_MAX} characters"));
    }
    if s.is_empty() || is_name_part(s) {
        Ok(())
    } else {
        Err("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', \
             and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or \
             '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
            .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains() {
        for ok in ["a", "web-0", "sigil-ca.sigil-system", "0abc"] {
            assert_eq!(check_dns1123_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Web", "a_b", "-a", "a-", "a..b", ".a", &"a".repeat(254)] {
            assert!(check_dns1123_subdomain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labels_reject_dots_and_long_names() {
        assert_eq!(check_dns1123_label("sigil-system"), Ok(()));
        assert!(check_dns1123_label("a.b").is_err());
        assert!(check_dns1123_label(&"a".repeat(64)).is_err());
    }

    #[test]
    fn qualified_names() {
        for ok in ["app", "app.kubernetes.io/name", "A_b.c"] {
            assert_eq!(check_qualified_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "/app", "Bad_Prefix/x", "a/", "-a", "a/b/c"] {
            assert!(check_qualified_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_values() {
        for ok in ["", "v1", "My_Value.2"] {
            assert_eq!(check_label_value(ok), Ok(()), "{ok}");
        }
        for bad in ["-x", "x y", "x/y", &"v".repeat(64)] {
            assert!(check_label_value(bad).is_err(), "{bad}");
        }
    }
}
