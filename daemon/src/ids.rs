//! Resource ids shaped like EC2's: a prefix, a dash and 17 lowercase hex digits.

/// A fresh random id such as `snap-0f3a…`.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 9];
    getrandom::getrandom(&mut bytes).expect("the kernel's random source is available");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{}", &hex[..17])
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_have_the_ec2_shape() {
        for prefix in ["snap", "vol", "ami", "bld"] {
            let id = super::new_id(prefix);
            amidala::proto::validate_id(prefix, &id).unwrap();
            assert_ne!(id, super::new_id(prefix));
        }
    }
}
