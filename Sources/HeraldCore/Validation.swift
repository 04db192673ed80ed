import Foundation

/// A value a client sent that Herald will not store. `field` names it the way the API does.
public struct ValidationError: Error, Sendable, Equatable {
    public var field: String
    public var message: String
    public init(field: String, message: String) {
        self.field = field
        self.message = message
    }
}

/// Checks on client input that need no database. Each returns the normalised value or throws.
public enum Validate {
    /// A BCP 47 language tag of the common shapes (`en`, `fr-CA`, `zh-Hant-TW`), in canonical
    /// case (`fr-ca` becomes `fr-CA`) so that templates and users match.
    public static func locale(_ value: String, field: String = "locale") throws(ValidationError) -> String {
        let pattern = #"^[A-Za-z]{2,3}(-[A-Za-z]{4})?(-([A-Za-z]{2}|[0-9]{3}))?$"#
        guard value.range(of: pattern, options: .regularExpression) != nil else {
            throw ValidationError(field: field, message: "\"\(value)\" is not a language tag such as \"en\" or \"fr-CA\".")
        }
        return value.split(separator: "-").enumerated().map { index, part in
            if index == 0 { return part.lowercased() }
            if part.count == 4 { return part.prefix(1).uppercased() + part.dropFirst().lowercased() }
            return part.uppercased()
        }.joined(separator: "-")
    }

    /// An IANA time zone known to this system, such as `Europe/Paris`.
    public static func timezone(_ value: String, field: String = "timezone") throws(ValidationError) -> String {
        // A name of the tz database: Foundation's list (ICU's canonical names, which lack many
        // current ones: Asia/Kolkata, Etc/UTC, US/Pacific), or a name of the database's shape
        // that both Foundation and the system's database (/usr/share/zoneinfo, which Debian's
        // PostgreSQL reads too) open. Foundation alone also opens "UTC+2", "GMT+0530" and ICU's
        // three-letter names ("IST", "CTT"), which PostgreSQL does not know or reads otherwise.
        let shaped =
            value.wholeMatch(of: /[A-Za-z][A-Za-z0-9_+-]*(\/[A-Za-z0-9_+-]+)*/) != nil
            && value.wholeMatch(of: /(UTC|GMT)[+-].*/) == nil
        let known =
            ianaZones.contains(value)
            || (shaped && TimeZone(identifier: value) != nil && FileManager.default.fileExists(atPath: "/usr/share/zoneinfo/" + value))
        guard known, value.count <= 64 else {
            throw ValidationError(field: field, message: "\"\(value)\" is not an IANA time zone (such as Europe/Paris or UTC).")
        }
        return value
    }

    private static let ianaZones: Set<String> = {
        let zones = Set(TimeZone.knownTimeZoneIdentifiers)
        return zones.isEmpty ? zones : zones.union(["UTC", "GMT"])
    }()

    /// A machine key: lowercase letters, digits, `-` and `_`, 2 to 64 characters.
    public static func key(_ value: String, field: String = "key") throws(ValidationError) -> String {
        try matching(value, #"^[a-z0-9][a-z0-9_-]{1,63}$"#, field, "must be 2 to 64 lowercase letters, digits, '-' or '_'.")
    }

    /// A notification type key: letters, digits, `_`, `.` and `-`, 2 to 100 characters (`ISQ_CRITICAL`).
    public static func typeKey(_ value: String, field: String = "key") throws(ValidationError) -> String {
        try matching(value, #"^[A-Za-z0-9][A-Za-z0-9_.-]{1,99}$"#, field, "must be 2 to 100 letters, digits, '_', '.' or '-'.")
    }

    /// An organisation slug: lowercase letters, digits and `-`, 2 to 63 characters.
    public static func slug(_ value: String, field: String = "slug") throws(ValidationError) -> String {
        try matching(value, #"^[a-z0-9][a-z0-9-]{1,62}$"#, field, "must be 2 to 63 lowercase letters, digits or '-'.")
    }

    /// `value` when the whole of it matches `pattern`; else 422 quoting it, then `rule`.
    private static func matching(_ value: String, _ pattern: String, _ field: String, _ rule: String) throws(ValidationError) -> String {
        guard value.range(of: pattern, options: .regularExpression) != nil else {
            throw ValidationError(field: field, message: "\"\(value)\" \(rule)")
        }
        return value
    }

    /// The largest a user's attributes may be, as compact JSON: they are read with every
    /// recipient of every notify whose audience holds the user.
    public static let maxAttributeBytes = 16 * 1024

    /// A user's attributes, at most `maxAttributeBytes` as JSON.
    public static func attributes(_ value: JSONValue, field: String = "attributes") throws(ValidationError) -> JSONValue {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .withoutEscapingSlashes
        let size = (try? encoder.encode(value).count) ?? 0
        guard size <= maxAttributeBytes else {
            throw ValidationError(
                field: field,
                message:
                    "is \(size) bytes as JSON, more than the \(maxAttributeBytes) a user's attributes may hold: keep what conditions test here, the rest in your own system."
            )
        }
        return value
    }

    /// Non-empty text with at most `max` characters, trimmed.
    public static func text(_ value: String, field: String, max: Int = 200) throws(ValidationError) -> String {
        let trimmed = value.trimmingCharacters(in: .whitespacesAndNewlines)
        if trimmed.isEmpty, !value.isEmpty { throw ValidationError(field: field, message: "must not be blank.") }
        guard !trimmed.isEmpty, trimmed.count <= max else {
            throw ValidationError(field: field, message: "must be 1 to \(max) characters.")
        }
        // Names go into headers (an email's From and To): one line, no control characters.
        if trimmed.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) {
            throw ValidationError(field: field, message: "must be one line of text, without line breaks, tabs or other control characters.")
        }
        return trimmed
    }

    /// A password of 12 to 1024 characters (NIST SP 800-63B: length over composition rules).
    public static func password(_ value: String, field: String = "password") throws(ValidationError) -> String {
        // Counted in Unicode code points, as the schema's minLength and maxLength count.
        guard value.unicodeScalars.count >= 12, value.unicodeScalars.count <= 1024 else {
            throw ValidationError(field: field, message: "must be 12 to 1024 characters.")
        }
        return value
    }

    /// Permission keys from the catalogue, de-duplicated.
    public static func permissions(_ values: [String], field: String = "permissions") throws(ValidationError) -> Set<Permission> {
        var result = Set<Permission>()
        for value in values {
            guard let permission = Permission(rawValue: value) else {
                throw ValidationError(field: field, message: "\"\(value)\" is not a permission; GET /v1/permissions lists them.")
            }
            result.insert(permission)
        }
        return result
    }

    /// A `key:value` tag (`team:sales`): a key of 1–32 lowercase letters, digits, `_`, `.`, `-`
    /// and a value of 1–64 characters without spaces or commas.
    public static func tag(_ value: String, field: String = "tags") throws(ValidationError) -> String {
        try matching(
            value, #"^[a-z0-9_.-]{1,32}:[^\s,]{1,64}$"#, field,
            "is not a tag such as \"team:sales\" (key: 1-32 of a-z 0-9 _ . -; value: 1-64 characters, no spaces or commas).")
    }

    /// A UUID in its canonical text form, and nothing after it: Foundation's parser reads a C
    /// string, so it stops at a U+0000 and takes "<uuid>\0junk" for the UUID.
    public static func uuid(_ value: String) -> UUID? {
        value.utf8.count == 36 ? UUID(uuidString: value) : nil
    }

    /// A time window whose `until` is not before its `since`, or 422 naming `until`: a reversed
    /// window is a mistake (the two swapped), not a question whose answer is "nothing".
    public static func window(since: Date?, until: Date?) throws(ValidationError) {
        guard let since, let until, until < since else { return }
        throw ValidationError(
            field: "until",
            message: "\(until.formatted(.iso8601)) is before since (\(since.formatted(.iso8601))); until ends the window since starts.")
    }

    /// `uuid(_:)`, or 422 naming `field`.
    public static func uuid(_ value: String, field: String) throws(ValidationError) -> UUID {
        guard let id = uuid(value) else {
            throw ValidationError(field: field, message: "\"\(value)\" is not a UUID.")
        }
        return id
    }

    /// An absolute http or https URL with a host, at most 2048 characters, written as RFC 3986
    /// says (ASCII, other characters percent-encoded, one `#` at most): where a notification
    /// leads. The same pattern as `openapi.yaml`'s, so that what is stored is what the contract
    /// promises when it is shown again.
    public static func linkURL(_ value: String, field: String) throws(ValidationError) -> String {
        let value = try httpURL(value, field: field)
        guard value.range(of: linkURLPattern, options: .regularExpression) != nil else {
            throw ValidationError(
                field: field,
                message: "must be an absolute http or https URL, in ASCII (percent-encode other characters), with at most one #.")
        }
        return value
    }

    /// An absolute http or https URL with a host, no spaces or control characters, at most 2048
    /// characters (an endpoint's, whose host may be an IP literal the SSRF guard then judges).
    public static func httpURL(_ value: String, field: String) throws(ValidationError) -> String {
        guard value.count <= 2048 else { throw ValidationError(field: field, message: "must be at most 2048 characters.") }
        guard !value.unicodeScalars.contains(where: { $0.properties.isWhitespace || $0.value < 0x20 || $0.value == 0x7F }),
            let url = URLComponents(string: value), let scheme = url.scheme?.lowercased(), scheme == "https" || scheme == "http",
            let host = url.host, !host.isEmpty
        else {
            throw ValidationError(field: field, message: "must be an absolute http or https URL.")
        }
        return value
    }

    /// `openapi.yaml`'s pattern for a link: scheme, host, optional port, path and query, fragment.
    public static let linkURLPattern =
        #"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?([/?]([A-Za-z0-9._~:/?@!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)?(#([A-Za-z0-9._~:/?@!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)?$"#
}

extension Array where Element: Equatable {
    /// Each element once, where it first stands (`["in_app", "in_app"]` was stored as sent).
    public func keepingFirstOfEach() -> [Element] {
        reduce(into: []) { kept, element in
            if !kept.contains(element) { kept.append(element) }
        }
    }
}
