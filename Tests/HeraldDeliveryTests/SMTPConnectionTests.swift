import Foundation
import HeraldDelivery
import Testing

@Suite("SMTP delivery against a real server")
struct SMTPConnectionTests {
    @Test func sendsTwoMessagesOverOneConnectionAndReportsRefusals() throws {
        // setup
        let sink = try SMTPSink()
        defer { sink.stop() }
        let connection = try SMTPConnection(
            settings: SMTPSettings(
                host: "127.0.0.1", port: sink.port, security: .plain, timeout: 10, clientName: "herald.test"))
        let first = MIMEMessage(
            from: .init("noreply@herald.test", name: "Hôpital Herald"),
            to: .init("ada@example.org", name: "Ada Lovelace"),
            subject: "Résultats disponibles ✓",
            textBody: "Bonjour Ada,\n.\nVos résultats sont prêts : https://herald.test/r/1?a=b\n",
            htmlBody: "<p>Bonjour Ada,</p>\n<p>Vos résultats sont <a href=\"https://herald.test/r/1?a=b\">prêts</a>.</p>\n",
            messageID: "first-1@herald.test",
            date: Date(timeIntervalSince1970: 1_751_360_700),
            extraHeaders: [
                ("List-Unsubscribe", "<https://herald.test/u/abc?sig=x>"),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ])
        var second = first
        second.subject = "Second message"
        second.htmlBody = nil
        second.messageID = "second-2@herald.test"
        let firstBytes = try first.encoded()
        let secondBytes = try second.encoded()

        // act
        let firstReply = try connection.send(from: "noreply@herald.test", to: ["ada@example.org"], message: firstBytes)
        let secondReply = try connection.send(
            from: "noreply@herald.test", to: ["ada@example.org", "bob@example.org"], message: secondBytes)

        // check: the final replies are the server's answers to the end of DATA
        #expect(firstReply == SMTPReply(code: 250, text: "2.0.0 Ok: queued as 1"))
        #expect(secondReply == SMTPReply(code: 250, text: "2.0.0 Ok: queued as 2"))
        // check: both came over the same TCP connection (same client port)
        let (env1, env2) = (try sink.envelope(1), try sink.envelope(2))
        #expect(env1.clientPort == env2.clientPort)
        #expect(env1.mailFrom == "noreply@herald.test" && env2.rcptTos == ["ada@example.org", "bob@example.org"])
        // check: bytes arrive unchanged (libcurl dot-stuffs the "." line, the server un-stuffs it)
        #expect(try sink.rawMessage(1) == firstBytes)
        #expect(try sink.rawMessage(2) == secondBytes)
        // check: an independent MIME parser sees the headers and both parts
        let parsed = try ParsedMessage.parse(sink.file(1, "eml"))
        #expect(parsed.defects.isEmpty)
        #expect(parsed.headers["Subject"] == "Résultats disponibles ✓")
        #expect(parsed.headers["From"] == "Hôpital Herald <noreply@herald.test>")
        #expect(parsed.headers["Message-ID"] == "<first-1@herald.test>")
        #expect(parsed.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click")
        #expect(parsed.contentType == "multipart/alternative")
        #expect(parsed.parts.map(\.contentType) == ["text/plain", "text/html"])
        #expect(normalized(parsed.parts[0].content) == normalized(first.textBody))
        #expect(normalized(parsed.parts[1].content) == normalized(first.htmlBody!))
        let parsedSecond = try ParsedMessage.parse(sink.file(2, "eml"))
        #expect(parsedSecond.contentType == "text/plain" && parsedSecond.parts.count == 1)

        // act + check: a refused recipient is a permanent refusal carrying the server's text
        #expect {
            _ = try connection.send(from: "noreply@herald.test", to: ["reject@example.org"], message: secondBytes)
        } throws: { error in
            guard let error = error as? SMTPError, case .refused(550, let text, "RCPT") = error else { return false }
            return text.contains("Recipient address rejected") && error.isPermanent && !error.isTransient
                && error.description
                    == "The mail server refused the recipient address (550 5.1.1 <reject@example.org>: Recipient address rejected)."
        }
        // ...and the connection object keeps working afterwards
        let thirdReply = try connection.send(from: "", to: ["ada@example.org"], message: secondBytes)
        #expect(thirdReply.code == 250)
        #expect(try sink.storedMessageCount() == 3)
    }

    @Test func nothingListeningIsATransientTransportError() throws {
        // setup
        let port = try SMTPSink.unusedPort()
        let connection = try SMTPConnection(settings: SMTPSettings(host: "127.0.0.1", port: port, security: .plain, timeout: 5))
        // act + check
        #expect {
            _ = try connection.send(from: "noreply@herald.test", to: ["ada@example.org"], message: Array("Subject: x\r\n\r\nx\r\n".utf8))
        } throws: { error in
            guard let error = error as? SMTPError, case .transport(7, let message, _) = error else { return false }
            return error.isTransient && message.contains("connect")
                && error.description.hasPrefix("Herald could not connect to the mail server (")
        }
    }

    @Test func startTLSRequiredButNotOfferedIsAPermanentTransportError() throws {
        // setup: the sink offers no STARTTLS
        let sink = try SMTPSink()
        defer { sink.stop() }
        let connection = try SMTPConnection(settings: SMTPSettings(host: "127.0.0.1", port: sink.port, security: .startTLS, timeout: 5))
        // act + check: CURLE_USE_SSL_FAILED (64); nothing was sent
        #expect {
            _ = try connection.send(from: "noreply@herald.test", to: ["ada@example.org"], message: Array("Subject: x\r\n\r\nx\r\n".utf8))
        } throws: { error in
            guard let error = error as? SMTPError, case .transport(64, _, _) = error else { return false }
            return !error.isTransient
                && error.description.hasPrefix("The mail server does not offer STARTTLS, which Herald's SMTP settings require (")
        }
        #expect(try sink.storedMessageCount() == 0)
    }

    @Test func envelopeAddressesWithLineBreaksAreRefusedBeforeConnecting() throws {
        let connection = try SMTPConnection(settings: SMTPSettings(host: "127.0.0.1", port: 1, security: .plain))
        #expect(throws: SMTPError.self) {
            _ = try connection.send(from: "a@b.test>\r\nRCPT TO:<x@y.test", to: ["ada@example.org"], message: [])
        }
        #expect(throws: SMTPError.invalidEnvelope("it has no recipient")) {
            _ = try connection.send(from: "a@b.test", to: [], message: [])
        }
        #expect(throws: SMTPError.self) {
            _ = try connection.send(from: "a@b.test", to: ["dr.m\u{00FC}ller\u{202E}@clinic.example"], message: [])
        }
    }

    // Issue 8 item 9: internationalised addresses (RFC 6531) where the server offers SMTPUTF8.
    @Test func internationalisedAddressesGoOutWithSMTPUTF8WhenTheServerOffersIt() throws {
        // setup
        let sink = try SMTPSink(smtputf8: true)
        defer { sink.stop() }
        let connection = try SMTPConnection(settings: SMTPSettings(host: "127.0.0.1", port: sink.port, security: .plain, timeout: 10))
        var message = MIMEMessage(
            from: .init("noreply@herald.test", name: "Herald"), to: .init("dr.müller@clinic.example", name: "Dr Müller"),
            subject: "Grüße", textBody: "Hallo\n", messageID: "utf8-1@herald.test", date: Date(timeIntervalSince1970: 1_751_360_700))
        let first = try message.encoded()
        message.to = .init("ada@bücher.example")
        let second = try message.encoded()

        // act: the first send on a fresh connection learns the server's extensions first
        #expect(try connection.supportsSMTPUTF8())
        let firstReply = try connection.send(from: "noreply@herald.test", to: ["dr.müller@clinic.example"], message: first)
        let secondReply = try connection.send(from: "noreply@herald.test", to: ["ada@bücher.example"], message: second)

        // check
        #expect(firstReply.code == 250 && secondReply.code == 250)
        let (env1, env2) = (try sink.envelope(1), try sink.envelope(2))
        #expect(env1.rcptTos == ["dr.müller@clinic.example"])
        #expect(env1.mailOptions.contains("SMTPUTF8") && env2.mailOptions.contains("SMTPUTF8"))
        #expect(env1.clientPort == env2.clientPort, "the probe's connection is the one reused")
        // libcurl writes an IDN domain on the envelope as its A-label; the header keeps Unicode.
        #expect(env2.rcptTos == ["ada@xn--bcher-kva.example"] || env2.rcptTos == ["ada@bücher.example"])
        #expect(try sink.rawMessage(1) == first)
        let parsed = try ParsedMessage.parse(sink.file(1, "eml"))
        #expect(parsed.headers["To"] == "Dr Müller <dr.müller@clinic.example>")
        #expect(try ParsedMessage.parse(sink.file(2, "eml")).headers["To"] == "ada@bücher.example")
    }

    @Test func internationalisedAddressesAreRefusedClearlyWhenTheServerLacksSMTPUTF8() throws {
        // setup: the sink does not offer SMTPUTF8
        let sink = try SMTPSink()
        defer { sink.stop() }
        let connection = try SMTPConnection(settings: SMTPSettings(host: "127.0.0.1", port: sink.port, security: .plain, timeout: 10))
        let message = try MIMEMessage(
            from: .init("noreply@herald.test"), to: .init("dr.müller@clinic.example"), subject: "x", textBody: "x",
            messageID: "utf8-2@herald.test", date: Date()
        ).encoded()
        // act + check: refused before MAIL FROM, permanently, in words
        #expect(throws: SMTPError.smtputf8Unsupported(address: "dr.müller@clinic.example")) {
            _ = try connection.send(from: "noreply@herald.test", to: ["dr.müller@clinic.example"], message: message)
        }
        let error = SMTPError.smtputf8Unsupported(address: "dr.müller@clinic.example")
        #expect(error.isPermanent)
        #expect(
            error.description
                == "The mail server does not support internationalised email addresses (SMTPUTF8), so Herald cannot send to \"dr.müller@clinic.example\"."
        )
        #expect(try sink.storedMessageCount() == 0)
        #expect(try !connection.supportsSMTPUTF8())
        // ...and ASCII mail still goes out over the same connection
        #expect(
            try connection.send(from: "noreply@herald.test", to: ["ada@example.org"], message: Array("Subject: x\r\n\r\nx\r\n".utf8)).code
                == 250)
    }

    @Test func refusalsAndFailuresReadAsSentences() {
        let cases: [(SMTPError, String)] = [
            (
                .refused(code: 553, text: "5.1.3 malformed address", command: "RCPT"),
                "The mail server refused the recipient address (553 5.1.3 malformed address)."
            ),
            (
                .refused(code: 451, text: "4.3.0 try again later", command: "RCPT"),
                "The mail server temporarily refused the recipient address (451 4.3.0 try again later)."
            ),
            (
                .refused(code: 553, text: "sender rejected", command: "MAIL"),
                "The mail server refused the sender address (553 sender rejected)."
            ),
            (.refused(code: 552, text: "message too big", command: "DATA"), "The mail server refused the message (552 message too big)."),
            (
                .refused(code: 535, text: "5.7.8 bad credentials", command: "AUTH"),
                "The mail server refused Herald's login; check the SMTP user name and password (535 5.7.8 bad credentials)."
            ),
            (
                .transport(curlCode: 28, message: "Timeout was reached", detail: ""),
                "The mail server did not answer in time (Timeout was reached)."
            ),
        ]
        for (error, sentence) in cases { #expect(error.description == sentence) }
    }

    private func normalized(_ text: String) -> String {
        text.replacingOccurrences(of: "\r\n", with: "\n").trimmingCharacters(in: .newlines)
    }
}
