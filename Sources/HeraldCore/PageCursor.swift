import Foundation

/// The position after the last row of a page, for keyset pagination on `(time, id)`.
/// Opaque to clients: base64url of a small JSON object.
public struct PageCursor: Sendable, Equatable, Codable {
    /// Microseconds since 1970, as PostgreSQL stores a timestamp, so that the next page starts
    /// exactly after this row (a `Date` round trip through a `Double` could miss by one).
    public var micros: Int64
    public var id: UUID

    public init(time: Date, id: UUID) {
        self.micros = Int64((time.timeIntervalSince1970 * 1_000_000).rounded())
        self.id = id
    }

    enum CodingKeys: String, CodingKey {
        case micros = "t"
        case id = "i"
    }

    /// The cursor as a client sees it.
    public var encoded: String {
        ((try? JSONEncoder().encode(self)) ?? Data()).base64URLEncoded
    }

    /// Parses a cursor a client sent back; throws a validation error for anything else.
    public init(encoded: String) throws(ValidationError) {
        // A time PostgreSQL can hold (years 1 to 9999): a crafted one past its range was a 500.
        guard let data = Data(base64URLEncoded: encoded), let cursor = try? JSONDecoder().decode(PageCursor.self, from: data),
            (-62_135_596_800_000_000...253_402_300_799_999_999).contains(cursor.micros)
        else {
            throw ValidationError(field: "cursor", message: "is not a cursor returned by this API.")
        }
        self = cursor
    }
}

/// A page size a client asked for, clamped to what the API allows.
public enum PageSize {
    public static let `default` = 50
    public static let maximum = 200

    public static func clamp(_ requested: Int?) throws(ValidationError) -> Int {
        guard let requested else { return `default` }
        guard (1...maximum).contains(requested) else {
            throw ValidationError(field: "limit", message: "must be between 1 and \(maximum).")
        }
        return requested
    }
}
