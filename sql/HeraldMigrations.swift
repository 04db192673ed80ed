import Foundation

/// The migrations this build ships: `sql/migrations`, copied into the build as a SwiftPM
/// resource, so `herald migrate` and `serve` do not depend on the working directory. The SQL
/// stays here, in `sql/`, where it is reviewed (docs/decisions.md, "Migrations ship as resources").
public enum ShippedMigrations {
    /// The directory of `NNNN_name.sql` files inside the build's resource bundle.
    public static var directory: URL {
        Bundle.module.bundleURL.appendingPathComponent("migrations", isDirectory: true)
    }
}
