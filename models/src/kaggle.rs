//! The Kaggle "fashion-images" catalog layout, which `trainer` trains from and `moda-sdk
//! describe --csv` reads: `fashion.csv` (one row per product) in a directory whose images sit
//! at `<Category>/<Gender>/Images/images_with_product_ids/<Image>`. One definition, so that
//! both find the same files.

use std::path::{Path, PathBuf};

/// The CSV file of the layout.
pub const CSV_FILE: &str = "fashion.csv";

/// The columns of `fashion.csv`, in order.
pub const COLUMNS: [&str; 10] = [
    "ProductId",
    "Gender",
    "Category",
    "SubCategory",
    "ProductType",
    "Colour",
    "Usage",
    "ProductTitle",
    "Image",
    "ImageURL",
];

/// The column naming each row's image file.
pub const IMAGE_COLUMN: &str = "Image";

/// Where a row's image is, below the catalog directory `root`.
pub fn image_path(root: &Path, category: &str, gender: &str, image: &str) -> PathBuf {
    root.join(category)
        .join(gender)
        .join("Images")
        .join("images_with_product_ids")
        .join(image)
}

/// Whether a CSV header row is the layout's: every column of [`COLUMNS`] present (in any order,
/// surrounding spaces ignored; more columns allowed).
pub fn is_layout_header<'a>(headers: impl IntoIterator<Item = &'a str> + Clone) -> bool {
    COLUMNS
        .iter()
        .all(|c| headers.clone().into_iter().any(|h| h.trim() == *c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_sit_below_category_and_gender() {
        assert_eq!(
            image_path(Path::new("cat"), "Apparel", "Boys", "42.jpg"),
            Path::new("cat/Apparel/Boys/Images/images_with_product_ids/42.jpg")
        );
    }

    #[test]
    fn the_header_is_recognised_by_its_columns() {
        assert!(is_layout_header(COLUMNS));
        let mut more = COLUMNS.to_vec();
        more.push("Extra");
        assert!(is_layout_header(more.iter().copied()));
        assert!(!is_layout_header(["ProductId", "Image"]));
    }
}
