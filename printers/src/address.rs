//! A postal address, with the field names Lob's API uses (`address_line1`, ...).

use serde::{Deserialize, Serialize};

/// A mailing address. Empty optional fields are omitted on the wire; unknown fields in
/// answers (a printer's `id`, a provider's extras) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// Recipient name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Company name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<String>,
    /// First address line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_line1: Option<String>,
    /// Second address line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_line2: Option<String>,
    /// City.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_city: Option<String>,
    /// State or region (two letters in the US).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_state: Option<String>,
    /// ZIP or postal code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_zip: Option<String>,
    /// ISO 3166 two-letter country code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address_country: Option<String>,
}

/// One field of an [`Address`], as named in approval rules and rule failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddressField {
    /// `name`
    Name,
    /// `company`
    Company,
    /// `address_line1`
    AddressLine1,
    /// `address_line2`
    AddressLine2,
    /// `address_city`
    AddressCity,
    /// `address_state`
    AddressState,
    /// `address_zip`
    AddressZip,
    /// `address_country`
    AddressCountry,
}

impl AddressField {
    /// Every field, in address order.
    pub const ALL: [AddressField; 8] = [
        AddressField::Name,
        AddressField::Company,
        AddressField::AddressLine1,
        AddressField::AddressLine2,
        AddressField::AddressCity,
        AddressField::AddressState,
        AddressField::AddressZip,
        AddressField::AddressCountry,
    ];

    /// The field's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressField::Name => "name",
            AddressField::Company => "company",
            AddressField::AddressLine1 => "address_line1",
            AddressField::AddressLine2 => "address_line2",
            AddressField::AddressCity => "address_city",
            AddressField::AddressState => "address_state",
            AddressField::AddressZip => "address_zip",
            AddressField::AddressCountry => "address_country",
        }
    }
}

impl Address {
    /// The field's value, `None` when absent or blank.
    pub fn get(&self, field: AddressField) -> Option<&str> {
        let v = match field {
            AddressField::Name => &self.name,
            AddressField::Company => &self.company,
            AddressField::AddressLine1 => &self.address_line1,
            AddressField::AddressLine2 => &self.address_line2,
            AddressField::AddressCity => &self.address_city,
            AddressField::AddressState => &self.address_state,
            AddressField::AddressZip => &self.address_zip,
            AddressField::AddressCountry => &self.address_country,
        };
        v.as_deref().filter(|s| !s.trim().is_empty())
    }

    /// The country, `US` when absent (Lob's default).
    pub fn country(&self) -> &str {
        self.get(AddressField::AddressCountry).unwrap_or("US")
    }
}
