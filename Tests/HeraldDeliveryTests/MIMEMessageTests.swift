import Foundation
import Testing

@testable import HeraldDelivery

@Suite("MIME message rendering")
struct MIMEMessageTests {
    static func message(
        subject: String = "Your report is ready",
        text: String = "Hello Ada,\nyour report is ready.\n",
        html: String? = "<p>Hello Ada,</p>\n<p>your report is ready.</p>\n",
        extraHeaders: [(name: String, value: String)] = []
    ) -> MIMEMessage {
        MIMEMessage(
            from: .init("noreply@herald.test", name: "Herald"),
            replyTo: .init("support@herald.test"),
            to: .init("ada@example.org", name: "Ada Lovelace"),
            subject: subject,
            textBody: text,
            htmlBody: html,
            messageID: "0190c1d2-7e4f@herald.test",
            date: Date(timeIntervalSince1970: 1_751_360_700), // 2025-07-01 09:05:00 UTC
            extraHeaders: extraHeaders
        )
    }

    @Test func headersAreWrittenInOrderWithMessageIDInAngleBrackets() throws {
        // setup
        let message = Self.message(extraHeaders: [
            ("List-Unsubscribe", "<https://herald.test/u/abc?sig=x>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ])
        // act
        let (headers, _) = split(try message.encoded())
        // check
        #expect(
            headers == [
                "Date: Tue, 01 Jul 2025 09:05:00 +0000",
                "From: \"Herald\" <noreply@herald.test>",
                "Reply-To: support@herald.test",
                "To: \"Ada Lovelace\" <ada@example.org>",
                "Subject: Your report is ready",
                "Message-ID: <0190c1d2-7e4f@herald.test>",
                "List-Unsubscribe: <https://herald.test/u/abc?sig=x>",
                "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
                "MIME-Version: 1.0",
                headers.last!, // Content-Type with the random boundary, checked below
            ])
        #expect(headers.last!.hasPrefix("Content-Type: multipart/alternative; boundary=\"=_Herald_")) // unfolded
    }

    @Test func dateIsRFC5322InUTC() {
        #expect(MIMEMessage.rfc5322Date(Date(timeIntervalSince1970: 0)) == "Thu, 01 Jan 1970 00:00:00 +0000")
        #expect(MIMEMessage.rfc5322Date(Date(timeIntervalSince1970: 1_709_208_000)) == "Thu, 29 Feb 2024 12:00:00 +0000")
    }

    @Test func multipartHasBoundaryDelimitersAndBothParts() throws {
        // act
        let bytes = try Self.message().encoded()
        let (headers, body) = split(bytes)
        // check
        let contentType = try #require(headers.first { $0.hasPrefix("Content-Type:") })
        let boundary = try #require(contentType.split(separator: "\"").dropFirst().first.map(String.init))
        #expect(boundary.count > 20)
        let lines = body.components(separatedBy: "\r\n")
        #expect(lines.filter { $0 == "--\(boundary)" }.count == 2)
        #expect(body.hasSuffix("\r\n--\(boundary)--\r\n"))
        #expect(
            body.contains(
                "--\(boundary)\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nHello Ada,\r\n"
            ))
        #expect(
            body.contains(
                "--\(boundary)\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>Hello Ada,</p>\r\n"
            ))
    }

    @Test func withoutHTMLTheMessageIsASingleTextPart() throws {
        let (headers, body) = split(try Self.message(html: nil).encoded())
        #expect(headers.suffix(2) == ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable"])
        #expect(!headers.joined().contains("multipart"))
        #expect(body == "Hello Ada,\r\nyour report is ready.\r\n")
    }

    @Test func everyLineEndsWithCRLFAndNoBareLFOrCR() throws {
        // setup: mixed line endings in both bodies, plus a long non-ASCII subject that folds
        let message = Self.message(
            subject: String(repeating: "Ünïcödé subject that is long enough to fold ", count: 3),
            text: "unix\nmac\rwindows\r\nend",
            html: "<p>a</p>\n\r\n<p>b</p>\r"
        )
        // act
        let bytes = try message.encoded()
        // check
        for (i, byte) in bytes.enumerated() {
            if byte == 0x0A { #expect(i > 0 && bytes[i - 1] == 0x0D, "bare LF at \(i)") }
            if byte == 0x0D { #expect(i + 1 < bytes.count && bytes[i + 1] == 0x0A, "bare CR at \(i)") }
        }
        #expect(bytes.suffix(2) == [0x0D, 0x0A])
        #expect(bytes.allSatisfy { $0 < 0x80 }, "7-bit clean")
        for line in String(decoding: bytes, as: UTF8.self).components(separatedBy: "\r\n") {
            #expect(line.utf8.count <= 78, "line too long: \(line)")
        }
    }

    @Test func quotedPrintableRoundTripsALongNonASCIILine() throws {
        // setup: one 400+ character line with multi-byte characters, "=", and trailing whitespace
        let line = String(repeating: "Grüße aus Köln — 100% naïve café = ✓ 🎉 ", count: 12) + "end \t "
        // act
        let (_, body) = split(try Self.message(text: line, html: nil).encoded())
        // check
        let encodedLines = body.components(separatedBy: "\r\n")
        #expect(encodedLines.count > 10, "soft line breaks were inserted")
        for encoded in encodedLines {
            #expect(encoded.utf8.count <= 76)
            #expect(!encoded.hasSuffix(" ") && !encoded.hasSuffix("\t"), "trailing whitespace must be encoded")
        }
        #expect(body.contains("=3D"), "'=' is encoded")
        #expect(body.contains("=C3=BC"), "ü is encoded as UTF-8 octets")
        #expect(decodeQuotedPrintable(body) == line + "\r\n")
    }

    @Test func quotedPrintableKeepsEscapesWholeAtTheLineLimit() {
        // 74 ASCII characters then "é": the escape must move to the next line, not be split.
        for prefix in 70...76 {
            let text = String(repeating: "a", count: prefix) + "ééé"
            let encoded = QuotedPrintable.encode(MIMEMessage.utf8Lines(text))
            #expect(encoded.components(separatedBy: "\r\n").allSatisfy { $0.utf8.count <= 76 })
            #expect(decodeQuotedPrintable(encoded) == text)
        }
    }

    @Test func nonASCIISubjectUsesRFC2047EncodedWords() throws {
        // setup
        let subject = "Rappel : réunion à 14 h 🎉 — ne manquez pas la présentation trimestrielle"
        // act
        let (headers, _) = split(try Self.message(subject: subject).encoded(), unfold: false)
        // check
        let start = try #require(headers.firstIndex { $0.hasPrefix("Subject: ") })
        let subjectLines = [headers[start]] + headers[(start + 1)...].prefix { $0.hasPrefix(" ") }
        #expect(subjectLines.count > 1, "long subject is split into several encoded words")
        #expect(subjectLines.allSatisfy { $0.utf8.count <= 76 })
        #expect(subjectLines[0].hasPrefix("Subject: =?UTF-8?B?"))
        #expect(decodeEncodedWords(subjectLines.joined(separator: "\r\n").dropFirst("Subject: ".count)) == subject)
    }

    @Test func nonASCIIDisplayNameIsEncodedAndASCIIOneQuoted() throws {
        var message = Self.message()
        message.from = .init("noreply@herald.test", name: "Hôpital Saint-Éloi")
        message.to = .init("ada@example.org", name: "Ada \"Countess\" Lovelace")
        let (headers, _) = split(try message.encoded())
        let from = try #require(headers.first { $0.hasPrefix("From: ") })
        #expect(from.hasPrefix("From: =?UTF-8?B?") && from.hasSuffix("?= <noreply@herald.test>"))
        #expect(decodeEncodedWords(from.dropFirst(6).prefix { $0 != "<" }.trimmingCharacters(in: .whitespaces)) == "Hôpital Saint-Éloi")
        #expect(headers.contains("To: \"Ada \\\"Countess\\\" Lovelace\" <ada@example.org>"))
    }

    @Test(arguments: [
        ("subject", "Hello\r\nBcc: victim@example.org"),
        ("subject", "Hello\nBcc: victim@example.org"),
        ("fromName", "Herald\rBcc: victim@example.org"),
        ("toAddress", "ada@example.org\r\nBcc: victim@example.org"),
        ("messageID", "id@herald.test>\r\nBcc: <victim@example.org"),
        ("extraValue", "<https://x>\r\nBcc: victim@example.org"),
        ("extraName", "X-Evil\r\nBcc"),
    ])
    func headerInjectionIsRefused(field: String, value: String) {
        var message = Self.message()
        switch field {
        case "subject": message.subject = value
        case "fromName": message.from.name = value
        case "toAddress": message.to.address = value
        case "messageID": message.messageID = value
        case "extraValue": message.extraHeaders = [("List-Unsubscribe", value)]
        default: message.extraHeaders = [(value, "x")]
        }
        #expect(throws: MIMEError.self) { try message.encoded() }
    }

    /// A subject rendered from a payload value with a line break, or an unbroken token longer
    /// than a line, is written (both once ended the delivery DEAD); set after the fact, a line
    /// break is still refused (above).
    @Test func subjectsFromDataAreWritten() throws {
        let broken = Self.message(subject: "Line one\nLine two\r\n\tand\u{7}three")
        #expect(broken.subject == "Line one Line two \tand three")
        let (headers, _) = split(try broken.encoded())
        #expect(headers.contains("Subject: Line one Line two \tand three"))
        let token = "deal-" + String(repeating: "x", count: 1_200)
        let long = try Self.message(subject: "Won: " + token).encoded()
        let (folded, _) = split(long, unfold: false)
        let start = try #require(folded.firstIndex { $0.hasPrefix("Subject: ") })
        let lines = [folded[start]] + folded[(start + 1)...].prefix { $0.hasPrefix(" ") }
        #expect(lines.allSatisfy { $0.utf8.count <= 76 } && lines.count > 20)
        let (unfolded, _) = split(long)
        let subject = try #require(unfolded.first { $0.hasPrefix("Subject: ") })
        #expect(decodeEncodedWords(String(subject.dropFirst(9))) == "Won: " + token)
    }

    @Test func extraHeadersCannotDuplicateGeneratedOnes() {
        let message = Self.message(extraHeaders: [("content-type", "text/plain")])
        #expect(throws: MIMEError.invalidHeader(name: "content-type", reason: "Herald writes this header itself")) {
            try message.encoded()
        }
    }

    // Issue 8 item 9: internationalised addresses are written in UTF-8 (RFC 6532) ...
    @Test func internationalisedAddressesAreWrittenInUTF8() throws {
        var message = Self.message()
        message.to = .init("dr.müller@clinic.example", name: "Dr Muller")
        message.replyTo = .init("empfang@bücher.example")
        #expect(message.isInternationalised && !Self.message().isInternationalised)
        let (headers, _) = split(try message.encoded())
        #expect(headers.contains("To: \"Dr Muller\" <dr.müller@clinic.example>"))
        #expect(headers.contains("Reply-To: empfang@bücher.example"))
    }

    // ... and every refusal reads as a sentence, never as a Swift enum dump.
    @Test(arguments: [
        (
            "to", "dr.x@clinic..example",
            "the recipient address \"dr.x@clinic..example\" cannot be used: the domain contains two dots in a row."
        ),
        (
            "to", "ada@example",
            "the recipient address \"ada@example\" cannot be used: the domain has no dot (a name such as clinic.example is needed)."
        ),
        (
            "from", ".noreply@herald.test",
            "the sender address \".noreply@herald.test\" cannot be used: the part before the @ starts or ends with a dot."
        ),
        (
            "replyTo", "empfang@bücher.example",
            "the Reply-To address \"empfang@bücher.example\" cannot be used: an internationalised Reply-To address needs an internationalised sender or recipient address."
        ),
        ("subject", "Hello\nBcc: x@y.example", "the Subject header cannot be written: it contains a line break."),
    ])
    func refusalsAreSentences(field: String, value: String, sentence: String) {
        var message = Self.message()
        switch field {
        case "to": message.to = .init(value)
        case "from": message.from = .init(value)
        case "replyTo": message.replyTo = .init(value)
        default: message.subject = value
        }
        let error = #expect(throws: MIMEError.self) { try message.encoded() }
        #expect(error?.description == sentence)
        if let error { #expect("\(error as any Error)" == sentence, "string interpolation, as the delivery sender uses it") }
    }

    // MARK: - Helpers

    /// Header lines (unfolded unless asked) and the body after the blank line.
    private func split(_ bytes: [UInt8], unfold: Bool = true) -> (headers: [String], body: String) {
        let text = String(decoding: bytes, as: UTF8.self)
        let range = text.range(of: "\r\n\r\n")!
        var head = String(text[..<range.lowerBound])
        if unfold { head = head.replacingOccurrences(of: "\r\n ", with: " ") }
        return (head.components(separatedBy: "\r\n"), String(text[range.upperBound...]))
    }
}

/// Independent QP decoder for the tests (RFC 2045 6.7): "=XX" octets and "=" CRLF soft breaks.
func decodeQuotedPrintable(_ text: String) -> String {
    let input = Array(text.utf8)
    var out: [UInt8] = []
    var i = 0
    while i < input.count {
        if input[i] == UInt8(ascii: "=") {
            if i + 2 < input.count, input[i + 1] == 0x0D, input[i + 2] == 0x0A { i += 3; continue }
            out.append(UInt8(String(decoding: input[(i + 1)...(i + 2)], as: UTF8.self), radix: 16)!)
            i += 3
        } else {
            out.append(input[i])
            i += 1
        }
    }
    return String(decoding: out, as: UTF8.self)
}

/// Decodes a run of `=?UTF-8?B?...?=` words separated by folding whitespace.
func decodeEncodedWords(_ value: some StringProtocol) -> String {
    var bytes: [UInt8] = []
    for word in value.split(whereSeparator: \.isWhitespace) {
        guard word.hasPrefix("=?UTF-8?B?"), word.hasSuffix("?=") else { return "<not an encoded word: \(word)>" }
        bytes += Data(base64Encoded: String(word.dropFirst(10).dropLast(2))) ?? Data()
    }
    return String(decoding: bytes, as: UTF8.self)
}
