import Foundation
import HeraldCore

/// One email, rendered to RFC 5322 / MIME bytes ready for `SMTPConnection.send`.
///
/// With an HTML body the result is `multipart/alternative` (text first, then HTML);
/// without one it is a single `text/plain` part. Bodies are UTF-8 in quoted-printable;
/// non-ASCII subjects and display names become RFC 2047 encoded words. Every header value
/// is checked: CR, LF and other control characters are refused, never passed through.
/// Addresses must be ones `EmailAddress` accepts. An internationalised From or To address
/// (RFC 6531) makes the message internationalised: addresses and the Message-ID may then carry
/// UTF-8 as RFC 6532 allows, and the transport sends it only to a server that offers SMTPUTF8.
public struct MIMEMessage: Sendable {
    /// An address with an optional display name, e.g. `"Ada Lovelace" <ada@example.org>`.
    public struct Mailbox: Sendable, Equatable {
        /// The bare address, e.g. `ada@example.org` (or `dr.müller@clinic.example`, see the type's notes).
        public var address: String
        /// Display name; any Unicode.
        public var name: String?

        /// A mailbox with an optional display name.
        public init(_ address: String, name: String? = nil) {
            self.address = address
            self.name = name
        }
    }

    /// Author (`From`).
    public var from: Mailbox
    /// Where replies should go (`Reply-To`), if not the author.
    public var replyTo: Mailbox?
    /// The single recipient (`To`).
    public var to: Mailbox
    /// Subject; any Unicode.
    public var subject: String
    /// Plain-text body; any line endings.
    public var textBody: String
    /// Optional HTML alternative of the same content.
    public var htmlBody: String?
    /// Message-ID without angle brackets, e.g. `0190c1d2@herald.example.org`.
    public var messageID: String
    /// Origination date (`Date`).
    public var date: Date
    /// Further ASCII headers in order, e.g. `("List-Unsubscribe", "<https://…>")`.
    public var extraHeaders: [(name: String, value: String)]

    /// A message; nothing is validated until `encoded()`.
    public init(
        from: Mailbox,
        replyTo: Mailbox? = nil,
        to: Mailbox,
        subject: String,
        textBody: String,
        htmlBody: String? = nil,
        messageID: String,
        date: Date,
        extraHeaders: [(name: String, value: String)] = []
    ) {
        self.from = from
        self.replyTo = replyTo
        self.to = to
        self.subject = Self.oneLine(subject)
        self.textBody = textBody
        self.htmlBody = htmlBody
        self.messageID = messageID
        self.date = date
        self.extraHeaders = extraHeaders
    }

    /// The complete message: headers and body, CRLF line endings throughout.
    public func encoded() throws(MIMEError) -> [UInt8] {
        // libcurl announces SMTPUTF8 only when an envelope address (From or To) is non-ASCII, so
        // UTF-8 may appear in header fields only then.
        let utf8 = isInternationalised
        var headers: [(String, String)] = [
            ("Date", Self.rfc5322Date(date)),
            ("From", try Self.mailbox(from, header: "From", utf8: utf8)),
        ]
        if let replyTo { headers.append(("Reply-To", try Self.mailbox(replyTo, header: "Reply-To", utf8: utf8))) }
        headers.append(("To", try Self.mailbox(to, header: "To", utf8: utf8)))
        headers.append(("Subject", try Self.unstructured(subject, header: "Subject")))
        headers.append(("Message-ID", "<\(try Self.messageIDValue(messageID, utf8: utf8))>"))
        for (name, value) in extraHeaders {
            try Self.validateExtraHeader(name: name, value: value)
            headers.append((name, value))
        }
        headers.append(("MIME-Version", "1.0"))

        let text = QuotedPrintable.encode(Self.utf8Lines(textBody))
        var out = ""
        func emit(_ headers: [(String, String)]) {
            for (name, value) in headers { out += "\(name): \(value)\r\n" }
            out += "\r\n"
        }

        if let htmlBody {
            let html = QuotedPrintable.encode(Self.utf8Lines(htmlBody))
            // QP output never contains "=_" (a literal "=" is always encoded), so this
            // boundary cannot occur in either body; the loop is belt and braces.
            var boundary: String
            repeat {
                boundary = "=_Herald_" + UUID().uuidString.replacingOccurrences(of: "-", with: "")
            } while text.contains(boundary) || html.contains(boundary)

            // Folded so the line stays under 78 characters.
            headers.append(("Content-Type", "multipart/alternative;\r\n boundary=\"\(boundary)\""))
            emit(headers)
            // The CRLF before each "--boundary" belongs to the delimiter, not the part.
            for (subtype, body) in [("plain", text), ("html", html)] {
                out += "--\(boundary)\r\n"
                emit([
                    ("Content-Type", "text/\(subtype); charset=utf-8"),
                    ("Content-Transfer-Encoding", "quoted-printable"),
                ])
                out += body + "\r\n"
            }
            out += "--\(boundary)--\r\n"
        } else {
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
            headers.append(("Content-Transfer-Encoding", "quoted-printable"))
            emit(headers)
            out += text
            if !out.hasSuffix("\r\n") { out += "\r\n" }
        }
        return Array(out.utf8)
    }

    /// Whether the From or To address is non-ASCII, so the message needs SMTPUTF8 (RFC 6531).
    public var isInternationalised: Bool {
        !EmailAddress.isASCII(from.address) || !EmailAddress.isASCII(to.address)
    }

    // MARK: - Header values

    /// Headers this type writes itself; callers may not add a second copy.
    private static let generatedHeaders: Set<String> = [
        "date", "from", "reply-to", "to", "subject", "message-id",
        "mime-version", "content-type", "content-transfer-encoding",
    ]

    /// RFC 5322 section 3.3, always in UTC: `Tue, 01 Jul 2025 09:05:00 +0000`.
    static func rfc5322Date(_ date: Date) -> String {
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = TimeZone(secondsFromGMT: 0)!
        let c = calendar.dateComponents([.year, .month, .day, .hour, .minute, .second, .weekday], from: date)
        let days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        func two(_ n: Int?) -> String { n.map { $0 < 10 ? "0\($0)" : "\($0)" } ?? "00" }
        return "\(days[c.weekday! - 1]), \(two(c.day)) \(months[c.month! - 1]) \(c.year!) "
            + "\(two(c.hour)):\(two(c.minute)):\(two(c.second)) +0000"
    }

    /// `"Display Name" <address>` or just `address`.
    private static func mailbox(_ mailbox: Mailbox, header: String, utf8: Bool) throws(MIMEError) -> String {
        let address = mailbox.address
        // Written exactly as given once valid: the envelope uses the same string.
        var problem: String? = address.trimmingCharacters(in: .whitespaces) == address ? nil : "it has spaces around it"
        do throws(EmailAddressError) { _ = try EmailAddress(address) } catch { problem = error.reason }
        if let problem { throw .invalidAddress(header: header, address: address, reason: problem) }
        if !utf8 && !EmailAddress.isASCII(address) {
            throw .invalidAddress(
                header: header, address: address,
                reason: "an internationalised \(header) address needs an internationalised sender or recipient address")
        }
        guard let name = mailbox.name, !name.isEmpty else { return address }
        try refuseControlCharacters(name, header: header)
        if name.unicodeScalars.allSatisfy(\.isASCII) {
            let escaped = name.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            return "\"\(escaped)\" <\(address)>"
        }
        return "\(EncodedWord.encode(name)) <\(address)>"
    }

    /// A subject as one line: a line break (from a payload value, or a template's text) is a
    /// space, as any other control character is, and runs of them one space. A Subject header
    /// cannot hold a line break, and refusing one ended the delivery `DEAD` over ordinary data.
    static func oneLine(_ text: String) -> String {
        guard text.unicodeScalars.contains(where: { ($0.value < 0x20 && $0 != "\t") || $0.value == 0x7F }) else { return text }
        var out = ""
        var spaced = false
        for scalar in text.unicodeScalars {
            if (scalar.value < 0x20 && scalar != "\t") || scalar.value == 0x7F {
                if !spaced { out.unicodeScalars.append(" ") }
                spaced = true
            } else {
                out.unicodeScalars.append(scalar)
                spaced = false
            }
        }
        return out
    }

    /// Free text such as Subject: ASCII is folded at spaces, anything else is RFC 2047 encoded,
    /// and so is ASCII with a word too long for a line (RFC 5321's 998 characters: an unbroken
    /// token in a payload value made the mail server refuse the message).
    private static func unstructured(_ value: String, header: String) throws(MIMEError) -> String {
        try refuseControlCharacters(value, header: header)
        // "=?" in plain text could be misread as an encoded word, so encode those too.
        guard value.unicodeScalars.allSatisfy(\.isASCII), !value.contains("=?"),
            !value.split(separator: " ").contains(where: { $0.utf8.count > 900 })
        else {
            return EncodedWord.encode(value)
        }
        // Fold before a space once a line would pass 78 characters (RFC 5322 2.1.1).
        var folded = ""
        var lineLength = header.count + 2
        for (index, word) in value.split(separator: " ", omittingEmptySubsequences: false).enumerated() {
            if index > 0 {
                if lineLength + 1 + word.count > 78 && lineLength > header.count + 2 {
                    folded += "\r\n"
                    lineLength = 0
                }
                folded += " "
                lineLength += 1
            }
            folded += word
            lineLength += word.count
        }
        return folded
    }

    /// RFC 5322 msg-id without the brackets; UTF-8 (RFC 6532) only in an internationalised message,
    /// where it comes from an internationalised sender domain.
    private static func messageIDValue(_ id: String, utf8: Bool) throws(MIMEError) -> String {
        try refuseControlCharacters(id, header: "Message-ID")
        let valid =
            id.contains("@")
            && id.unicodeScalars.allSatisfy {
                ($0.isASCII || utf8) && $0.value > 0x20 && $0.value != 0x7F && !$0.properties.isWhitespace && $0 != "<" && $0 != ">"
            }
        guard valid else { throw .invalidHeader(name: "Message-ID", reason: "it is not of the form id@domain (\(id.debugDescription))") }
        return id
    }

    private static func validateExtraHeader(name: String, value: String) throws(MIMEError) {
        let validName = !name.isEmpty && name.unicodeScalars.allSatisfy { $0.value >= 33 && $0.value <= 126 && $0 != ":" }
        guard validName else { throw .invalidHeader(name: name, reason: "the header name is not valid") }
        guard !generatedHeaders.contains(name.lowercased()) else {
            throw .invalidHeader(name: name, reason: "Herald writes this header itself")
        }
        try refuseControlCharacters(value, header: name)
        guard value.unicodeScalars.allSatisfy(\.isASCII) else {
            throw .invalidHeader(name: name, reason: "its value contains non-ASCII characters")
        }
        guard name.utf8.count + 2 + value.utf8.count <= 998 else {
            throw .invalidHeader(name: name, reason: "the line is longer than 998 characters")
        }
    }

    /// CR/LF would let a caller start a new header (header injection); other C0 controls
    /// and DEL have no business in a header either. Tab is allowed.
    private static func refuseControlCharacters(_ value: String, header: String) throws(MIMEError) {
        for scalar in value.unicodeScalars where (scalar.value < 0x20 && scalar != "\t") || scalar.value == 0x7F {
            let reason = scalar == "\r" || scalar == "\n" ? "it contains a line break" : "it contains a control character"
            throw .invalidHeader(name: header, reason: reason)
        }
    }

    /// Body text split into lines of UTF-8 bytes; CRLF, CR and LF all end a line.
    static func utf8Lines(_ text: String) -> [ArraySlice<UInt8>] {
        let bytes = Array(text.utf8)
        var lines: [ArraySlice<UInt8>] = []
        var start = 0
        var i = 0
        while i < bytes.count {
            if bytes[i] == 0x0D || bytes[i] == 0x0A {
                lines.append(bytes[start..<i])
                if bytes[i] == 0x0D, i + 1 < bytes.count, bytes[i + 1] == 0x0A { i += 1 }
                start = i + 1
            }
            i += 1
        }
        lines.append(bytes[start...])
        return lines
    }
}

/// Why a message could not be rendered. `description` is a clause a tenant admin can read
/// after "The message could not be built: " (it ends up as a delivery's DEAD reason).
public enum MIMEError: Error, Sendable, Equatable, CustomStringConvertible {
    /// A header value or name supplied by the caller is unsafe or malformed; `reason` is a clause.
    case invalidHeader(name: String, reason: String)
    /// A From, Reply-To or To address Herald cannot send to; `reason` is a clause.
    case invalidAddress(header: String, address: String, reason: String)

    public var description: String {
        switch self {
        case .invalidHeader(let name, let reason):
            return "the \(name) header cannot be written: \(reason)."
        case .invalidAddress(let header, let address, let reason):
            let role =
                switch header {
                case "From": "sender"
                case "To": "recipient"
                default: header
                }
            return "the \(role) address \(address.debugDescription) cannot be used: \(reason)."
        }
    }
}

/// Quoted-printable body encoding (RFC 2045 section 6.7).
enum QuotedPrintable {
    private static let hex = Array("0123456789ABCDEF".utf8)

    /// Encodes lines (without their line breaks); the result joins them with CRLF.
    /// Encoded lines are at most 76 characters, soft breaks ("=" CRLF) included.
    static func encode(_ lines: [ArraySlice<UInt8>]) -> String {
        var out: [UInt8] = []
        for (lineIndex, line) in lines.enumerated() {
            if lineIndex > 0 { out += [0x0D, 0x0A] }
            var lineLength = 0
            for (offset, byte) in zip(line.indices, line) {
                let isLastByte = offset == line.index(before: line.endIndex)
                let isWhitespace = byte == 0x20 || byte == 0x09
                // Literal: printable ASCII except "=", and space/tab unless they end the line
                // (trailing whitespace may be stripped in transit).
                let literal = (byte >= 33 && byte <= 126 && byte != 0x3D) || (isWhitespace && !isLastByte)
                let token: [UInt8] = literal ? [byte] : [0x3D, hex[Int(byte >> 4)], hex[Int(byte & 0x0F)]]
                // A soft break costs one "=": keep 75 characters before it. The line's
                // final token may use the 76th column since no "=" follows it.
                let limit = isLastByte ? 76 : 75
                if lineLength + token.count > limit {
                    out += [0x3D, 0x0D, 0x0A]
                    lineLength = 0
                }
                out += token
                lineLength += token.count
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// RFC 2047 "B" encoded words for header text.
enum EncodedWord {
    /// UTF-8 bytes per word: 39 bytes → 52 base64 characters → a 64-character word,
    /// which leaves room for a header name on the first line within 76 characters.
    private static let maxBytesPerWord = 39

    /// One or more `=?UTF-8?B?…?=` words separated by folding whitespace (ignored between
    /// encoded words when decoded). Never splits a character, so each word is valid UTF-8.
    static func encode(_ text: String) -> String {
        var chunks: [[UInt8]] = []
        var current: [UInt8] = []
        func add(_ bytes: some Collection<UInt8>) {
            if current.count + bytes.count > maxBytesPerWord, !current.isEmpty {
                chunks.append(current)
                current = []
            }
            current += bytes
        }
        for character in text {
            let bytes = Array(character.utf8)
            if bytes.count <= maxBytesPerWord {
                add(bytes)
            } else {
                // A huge grapheme cluster (e.g. a long emoji sequence): split between scalars.
                for scalar in character.unicodeScalars { add(Array(String(scalar).utf8)) }
            }
        }
        if !current.isEmpty || chunks.isEmpty { chunks.append(current) }
        return chunks.map { "=?UTF-8?B?\(Data($0).base64EncodedString())?=" }.joined(separator: "\r\n ")
    }
}
