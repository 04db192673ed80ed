import Foundation

extension Data {
    /// Base64url without padding (RFC 4648 §5): cursors, tokens, JWT parts.
    public var base64URLEncoded: String {
        base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    /// Decodes base64url with or without padding.
    public init?(base64URLEncoded text: String) {
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while base64.count % 4 != 0 { base64 += "=" }
        self.init(base64Encoded: base64)
    }
}

/// `value` as a JSON string literal (quotes and escapes included, slashes left alone).
public func jsonQuoted(_ value: String) -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.withoutEscapingSlashes]
    let data = (try? encoder.encode(value)) ?? Data("\"\"".utf8)
    return String(decoding: data, as: UTF8.self)
}

extension UUID {
    /// The canonical lower-case text form, as the API and the logs write ids.
    public var lowercased: String { uuidString.lowercased() }
}
