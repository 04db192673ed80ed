import Foundation

/// An email address Herald can send to: an RFC 5321 mailbox whose local part is a dot-atom
/// (RFC 5322 3.2.3, with UTF-8 as RFC 6532 allows) and whose domain is a host name.
///
/// Quoted local parts (`"a b"@x.example`) and address literals (`a@[192.0.2.1]`) are refused:
/// real mailboxes almost never need them and many servers refuse them. Internationalised
/// addresses (non-ASCII local part or domain) are accepted and kept in Unicode (NFC); sending one
/// needs a server that offers SMTPUTF8 (RFC 6531), which the email transport checks (issue 8 item 9).
public struct EmailAddress: Sendable, Hashable, CustomStringConvertible {
    /// The part before the `@`, as sent (NFC).
    public let localPart: String
    /// The part after the `@`, as sent (NFC).
    public let domain: String

    /// Parses `text` (surrounding spaces trimmed) or throws the reason it cannot be sent to.
    public init(_ text: String) throws(EmailAddressError) {
        let address = Self.trimmedNFC(text)
        guard !address.isEmpty else { throw .init("it is empty") }
        let parts = address.split(separator: "@", omittingEmptySubsequences: false)
        guard parts.count >= 2 else { throw .init("it has no @") }
        guard parts.count == 2 else { throw .init("it has more than one @") }
        let local = String(parts[0]), domain = String(parts[1])
        try Self.checkLocalPart(local)
        try Self.checkDomain(domain)
        // RFC 5321 4.5.3.1.3: a path is at most 256 octets including the angle brackets.
        guard address.utf8.count <= 254 else { throw .init("it is longer than 254 bytes") }
        self.localPart = local
        self.domain = domain
    }

    /// `text` without the spaces around it, in NFC. ASCII with no space or tab at either end is
    /// already both, and is returned as it is: Foundation's trimming and normalisation were most
    /// of the 3 % of the worker's CPU that checking each message's addresses took (issue 12).
    private static func trimmedNFC(_ text: String) -> String {
        let utf8 = text.utf8
        if let first = utf8.first, let last = utf8.last, utf8.allSatisfy({ $0 < 0x80 }),
            first != UInt8(ascii: " "), first != UInt8(ascii: "\t"), last != UInt8(ascii: " "), last != UInt8(ascii: "\t")
        {
            return text
        }
        return text.trimmingCharacters(in: .whitespaces).precomposedStringWithCanonicalMapping
    }

    /// `local@domain`.
    public var description: String { "\(localPart)@\(domain)" }

    /// Whether any part is non-ASCII: such an address can only be sent through a server that
    /// offers SMTPUTF8 (RFC 6531), with UTF-8 headers (RFC 6532).
    public var isInternationalised: Bool { !description.unicodeScalars.allSatisfy(\.isASCII) }

    /// Whether `text` contains only ASCII characters.
    public static func isASCII(_ text: String) -> Bool { text.unicodeScalars.allSatisfy(\.isASCII) }

    // MARK: - Rules

    /// RFC 5322 atext besides letters and digits.
    private static let atextSymbols = Set("!#$%&'*+-/=?^_`{|}~".unicodeScalars)

    private static func checkLocalPart(_ local: String) throws(EmailAddressError) {
        guard !local.isEmpty else { throw .init("nothing comes before the @") }
        guard local.utf8.count <= 64 else { throw .init("the part before the @ is longer than 64 bytes") }
        guard !local.hasPrefix("."), !local.hasSuffix(".") else { throw .init("the part before the @ starts or ends with a dot") }
        guard !local.contains("..") else { throw .init("the part before the @ contains two dots in a row") }
        for scalar in local.unicodeScalars {
            let allowed: Bool
            if scalar.isASCII {
                allowed =
                    ("a"..."z").contains(scalar) || ("A"..."Z").contains(scalar) || ("0"..."9").contains(scalar) || scalar == "."
                    || atextSymbols.contains(scalar)
            } else {
                allowed = isWordLike(scalar)
            }
            guard allowed else { throw .init("the part before the @ contains \(describe(scalar)), which is not allowed") }
        }
    }

    private static func checkDomain(_ domain: String) throws(EmailAddressError) {
        guard !domain.isEmpty else { throw .init("nothing comes after the @") }
        guard !domain.hasPrefix("[") else { throw .init("address literals such as [192.0.2.1] are not accepted; use a domain name") }
        guard domain.utf8.count <= 253 else { throw .init("the domain is longer than 253 bytes") }
        guard !domain.hasPrefix("."), !domain.hasSuffix(".") else { throw .init("the domain starts or ends with a dot") }
        let labels = domain.split(separator: ".", omittingEmptySubsequences: false)
        guard !labels.contains(where: \.isEmpty) else { throw .init("the domain contains two dots in a row") }
        guard labels.count >= 2 else { throw .init("the domain has no dot (a name such as clinic.example is needed)") }
        for label in labels {
            guard label.utf8.count <= 63 else { throw .init("a label of the domain is longer than 63 bytes") }
            for scalar in label.unicodeScalars {
                let allowed =
                    scalar.isASCII
                    ? (("a"..."z").contains(scalar) || ("A"..."Z").contains(scalar) || ("0"..."9").contains(scalar) || scalar == "-")
                    : isWordLike(scalar)
                guard allowed else { throw .init("the domain contains \(describe(scalar)), which is not allowed in a host name") }
            }
            guard !label.hasPrefix("-"), !label.hasSuffix("-") else { throw .init("a label of the domain starts or ends with a hyphen") }
        }
        // RFC 3696 2: a top-level domain is never all digits, so "a@10.0.0.1" is not a host name.
        guard !labels[labels.count - 1].allSatisfy(\.isASCIIDigit) else { throw .init("the domain ends in a label of digits only") }
    }

    /// Non-ASCII characters allowed in either part: letters, combining marks and digits. Spaces,
    /// controls, format characters (bidi overrides that disguise an address), symbols and
    /// unassigned code points are refused.
    private static func isWordLike(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter,
            .nonspacingMark, .spacingMark, .enclosingMark, .decimalNumber:
            true
        default:
            false
        }
    }

    private static func describe(_ scalar: Unicode.Scalar) -> String {
        switch scalar {
        case " ": "a space"
        case _ where scalar.value < 0x20 || scalar.value == 0x7F: "a control character"
        case _ where scalar.properties.isWhitespace: "a space character"
        case _ where scalar.properties.generalCategory == .format: "an invisible formatting character"
        default: "\"\(scalar)\""
        }
    }
}

/// Why text is not an email address Herald can send to. `reason` completes a sentence such as
/// "… is not an email address Herald can send to: the domain contains two dots in a row."
public struct EmailAddressError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Lower-case clause without a final full stop.
    public let reason: String

    init(_ reason: String) { self.reason = reason }

    public var description: String { reason }
}

extension Character {
    fileprivate var isASCIIDigit: Bool { isASCII && isNumber }
}

extension Validate {
    /// An email address Herald can send to (see `EmailAddress`), trimmed and in NFC; the error
    /// names `field` and says what is wrong in words a tenant admin understands.
    public static func emailAddress(_ value: String, field: String = "email") throws(ValidationError) -> String {
        do throws(EmailAddressError) {
            return try EmailAddress(value).description
        } catch {
            let shown = value.count > 80 ? String(value.prefix(80)) + "…" : value
            throw ValidationError(
                field: field, message: "\(shown.debugDescription) is not an email address Herald can send to: \(error.reason).")
        }
    }
}
