//! Prometheus helpers shared by every process's metrics.

/// Label values in Prometheus' snake_case, the same words the audit log uses: a type with
/// `fn as_str(self) -> &'static str` becomes a Prometheus label value.
#[macro_export]
macro_rules! label_value_as_str {
    ($($t:ty),*) => {$(
        impl prometheus_client::encoding::EncodeLabelValue for $t {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
            ) -> Result<(), std::fmt::Error> {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )*};
}
