import Foundation
import Testing
import HeraldDelivery

@Suite("SMTP delivery against a real server")
struct SMTPConnectionTests {
    @Test func sendsTwoMessagesOverOneConnectionAndReportsRefusals() throws {
        // setup
        let sink = try SMTPSink()
        defer { sink.stop() }
        let connection = try SMTPConnection(settings: SMTPSettings(
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
            guard let error = error as? SMTPError, case .refused(550, let text) = error else { return false }
            return text.contains("Recipient address rejected") && error.isPermanent && !error.isTransient
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
        }
        #expect(try sink.storedMessageCount() == 0)
    }

    @Test func envelopeAddressesWithLineBreaksAreRefusedBeforeConnecting() throws {
        let connection = try SMTPConnection(settings: SMTPSettings(host: "127.0.0.1", port: 1, security: .plain))
        #expect(throws: SMTPError.self) {
            _ = try connection.send(from: "a@b.test>\r\nRCPT TO:<x@y.test", to: ["ada@example.org"], message: [])
        }
        #expect(throws: SMTPError.invalidEnvelope("no recipients")) {
            _ = try connection.send(from: "a@b.test", to: [], message: [])
        }
    }

    private func normalized(_ text: String) -> String {
        text.replacingOccurrences(of: "\r\n", with: "\n").trimmingCharacters(in: .newlines)
    }
}
