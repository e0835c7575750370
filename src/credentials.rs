//! The app credentials Eshopbox issues for a custom app.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

use crate::error::Error;

/// The `client_id`, `client_secret` and long-lived `refresh_token` of an Eshopbox app
/// (Apps › Create a custom app in the Eshopbox workspace).
///
/// The secret and the refresh token are kept in [`secrecy::SecretString`]: `Debug`
/// prints them as `[redacted]`, and their memory is zeroed on drop.
///
/// ```
/// use eshopbox_auth::Credentials;
///
/// let creds = Credentials::new("my-client-id", "my-client-secret", "my-refresh-token");
/// let shown = format!("{creds:?}");
/// assert!(shown.contains("my-client-id"));
/// assert!(!shown.contains("my-client-secret"));
/// assert!(!shown.contains("my-refresh-token"));
/// ```
#[derive(Clone)]
pub struct Credentials {
    pub(crate) client_id: String,
    pub(crate) client_secret: SecretString,
    pub(crate) refresh_token: SecretString,
}

impl Credentials {
    /// Credentials from the app's client id, client secret and refresh token.
    pub fn new(
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        refresh_token: impl Into<String>,
    ) -> Self {
        Credentials {
            client_id: client_id.into(),
            client_secret: SecretString::from(client_secret.into()),
            refresh_token: SecretString::from(refresh_token.into()),
        }
    }

    /// The client id (not a secret).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Refuses empty or whitespace-only fields, naming the field and never its value.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        require_all(
            "credentials: ",
            &[
                ("client_id", self.client_id.as_str()),
                ("client_secret", self.client_secret.expose_secret()),
                ("refresh_token", self.refresh_token.expose_secret()),
            ],
        )
    }
}

/// Refuses the first empty or whitespace-only field, naming it and never its value.
pub(crate) fn require_all(context: &str, fields: &[(&str, &str)]) -> Result<(), Error> {
    match fields.iter().find(|(_, value)| value.trim().is_empty()) {
        Some((name, _)) => Err(Error::config(format!("{context}{name} is empty"))),
        None => Ok(()),
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("refresh_token", &"[redacted]")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn empty_fields_are_refused_by_name() {
        let err = Credentials::new("id", " ", "rt").validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("client_secret is empty"));
        let err = Credentials::new("", "s", "rt").validate().unwrap_err();
        assert!(err.to_string().contains("client_id is empty"));
        let err = Credentials::new("id", "s", "").validate().unwrap_err();
        assert!(err.to_string().contains("refresh_token is empty"));
        assert!(Credentials::new("id", "s", "rt").validate().is_ok());
    }
}
