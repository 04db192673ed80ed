import Foundation

extension Data {
    /// Base64url without padding (RFC 4648 §5): cursors, tokens, JWT parts.
    public var base64URLEncoded: String {
        base64URLEncodedString(self)
    }

    /// Decodes base64url with or without padding (the standard alphabet's `+` and `/` are
    /// accepted too); nil for any other character or an impossible length. Decoded byte by byte:
    /// it runs for every access token, and Foundation's decoder behind string replacements was
    /// 5 % of a busy server's CPU.
    public init?(base64URLEncoded text: String) {
        var utf8 = Substring(text).utf8
        var padding = 0
        while utf8.last == UInt8(ascii: "="), padding < 2 {
            utf8.removeLast()
            padding += 1
        }
        guard utf8.count % 4 != 1 else { return nil }
        guard let decoded = base64URLSextets(utf8, acceptingStandardAlphabet: true) else { return nil }
        self.init(decoded.bytes)
    }
}

private let base64URLAlphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".utf8)

/// `bytes` as base64url without padding, byte by byte (Foundation's encoder behind three string
/// replacements was 3 % of a feed read's CPU, for the cursor): cursors, link tokens, JWT parts.
public func base64URLEncodedString(_ bytes: some Sequence<UInt8>) -> String {
    let alphabet = base64URLAlphabet
    var out: [UInt8] = []
    out.reserveCapacity((bytes.underestimatedCount * 4 + 2) / 3)
    var buffer: UInt32 = 0
    var bits = 0
    for byte in bytes {
        buffer = buffer << 8 | UInt32(byte)
        bits += 8
        while bits >= 6 {
            bits -= 6
            out.append(alphabet[Int((buffer >> UInt32(bits)) & 0x3F)])
        }
        buffer &= (1 << UInt32(bits)) - 1
    }
    if bits > 0 { out.append(alphabet[Int((buffer << UInt32(6 - bits)) & 0x3F)]) }
    return String(decoding: out, as: UTF8.self)
}

/// Base64 characters to bytes: the URL-safe alphabet (and `+`, `/` if asked), no padding. Also
/// says what is left over: the number of unused trailing bits and their value (a strict decoder
/// wants fewer than 6, all zero). nil for any other character.
func base64URLSextets(
    _ utf8: some Collection<UInt8>, acceptingStandardAlphabet: Bool
) -> (bytes: [UInt8], leftoverBits: Int, leftover: UInt32)? {
    var bytes: [UInt8] = []
    bytes.reserveCapacity(utf8.count * 3 / 4)
    var buffer: UInt32 = 0
    var bits = 0
    for character in utf8 {
        let sextet: UInt8
        switch character {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): sextet = character - UInt8(ascii: "A")
        case UInt8(ascii: "a")...UInt8(ascii: "z"): sextet = character - UInt8(ascii: "a") + 26
        case UInt8(ascii: "0")...UInt8(ascii: "9"): sextet = character - UInt8(ascii: "0") + 52
        case UInt8(ascii: "-"): sextet = 62
        case UInt8(ascii: "_"): sextet = 63
        case UInt8(ascii: "+") where acceptingStandardAlphabet: sextet = 62
        case UInt8(ascii: "/") where acceptingStandardAlphabet: sextet = 63
        default: return nil
        }
        buffer = buffer << 6 | UInt32(sextet)
        bits += 6
        if bits >= 8 {
            bits -= 8
            bytes.append(UInt8(truncatingIfNeeded: buffer >> UInt32(bits)))
            buffer &= (1 << UInt32(bits)) - 1
        }
    }
    return (bytes, bits, buffer)
}

/// `text` safe inside HTML text and double-quoted attributes (`&`, `<`, `>`, `"`, `'`), code
/// point by code point: compared as characters, `"` followed by a combining mark (U+0301) is one
/// character that is not `"`, and went out as a raw quote that closes an attribute.
public func htmlEscaped(_ text: String) -> String {
    guard text.utf8.contains(where: { $0 == 0x26 || $0 == 0x3C || $0 == 0x3E || $0 == 0x22 || $0 == 0x27 }) else { return text }
    var out = ""
    out.reserveCapacity(text.utf8.count + 16)
    for scalar in text.unicodeScalars {
        switch scalar {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&#39;"
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out
}

/// `value` as a JSON string literal (quotes and escapes included, slashes left alone): the bytes
/// `JSONEncoder` writes with `.withoutEscapingSlashes` (quote, backslash and control characters
/// escaped, everything else as it is), without an encoder (live streams write one per field).
public func jsonQuoted(_ value: String) -> String {
    guard value.utf8.contains(where: { $0 < 0x20 || $0 == 0x22 || $0 == 0x5C }) else { return "\"" + value + "\"" }
    var out = "\""
    for scalar in value.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\r": out += "\\r"
        case "\t": out += "\\t"
        case "\u{08}": out += "\\b"
        case "\u{0C}": out += "\\f"
        case _ where scalar.value < 0x20:
            let hex = String(scalar.value, radix: 16)
            out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out + "\""
}

/// `,"subject":{"id":…,"type":…}` when there is a subject `type`, else nothing: the member the
/// hand-written JSON of feed items and webhook bodies share, as `JSONEncoder` writes it.
public func jsonSubjectMember(type: String?, id: String?) -> String {
    guard let type else { return "" }
    return ",\"subject\":{\"id\":" + jsonQuoted(id ?? "") + ",\"type\":" + jsonQuoted(type) + "}"
}

extension UUID {
    /// The canonical lower-case text form, as the API and the logs write ids. Written from the
    /// bytes: `uuidString` goes through `snprintf` on Linux (2 % of a feed read's CPU, 40 ids a page).
    public var lowercased: String { text(hexDigits: "0123456789abcdef") }

    /// The canonical upper-case form, as `uuidString` and `Codable` write it.
    public var uppercased: String { text(hexDigits: "0123456789ABCDEF") }

    private func text(hexDigits: StaticString) -> String {
        let digits = UnsafeBufferPointer(start: hexDigits.utf8Start, count: 16)
        return withUnsafeBytes(of: uuid) { bytes in
            String(unsafeUninitializedCapacity: 36) { out in
                var at = 0
                for (index, byte) in bytes.enumerated() {
                    if index == 4 || index == 6 || index == 8 || index == 10 {
                        out[at] = UInt8(ascii: "-")
                        at += 1
                    }
                    out[at] = digits[Int(byte >> 4)]
                    out[at + 1] = digits[Int(byte & 0x0F)]
                    at += 2
                }
                return at
            }
        }
    }
}
