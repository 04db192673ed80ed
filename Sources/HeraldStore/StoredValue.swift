import Foundation
import HeraldCore

/// A value in the database that Herald cannot read: a word its vocabulary does not have, or
/// JSON of the wrong shape. It fails the one request or task that read it (a logged 500),
/// never the process, and is never replaced by a default that would answer something false.
public struct StoredValueError: Error, Sendable, CustomStringConvertible {
    /// The column (or JSON document) that held the value.
    public var column: String
    /// What was wrong, without the value itself when it may be tenant data.
    public var problem: String
    public var description: String { "\(column): \(problem)" }
}

/// A stored word as a vocabulary type (`Severity`, `NotificationChannel`, …).
func stored<T: RawRepresentable>(_ raw: String, _ column: String, as type: T.Type = T.self) throws -> T where T.RawValue == String {
    guard let value = T(rawValue: raw) else { throw StoredValueError(column: column, problem: "\"\(raw)\" is not a \(T.self)") }
    return value
}

/// Stored JSON text as a Codable value.
func storedJSON<T: Decodable>(_ text: String, _ column: String, as type: T.Type = T.self) throws -> T {
    do {
        return try JSONDecoder().decode(T.self, from: Data(text.utf8))
    } catch {
        throw StoredValueError(column: column, problem: "not a JSON \(T.self)")
    }
}
