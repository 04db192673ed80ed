import Foundation
import HTTPTypes
import HeraldCore
import HummingbirdTesting
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldStore

/// `POST /v1/notification-types/{typeId}/preview`: what a recipient would get on a channel,
/// rendered as notify and the workers render it, from the stored templates or a draft.
@Suite("Template preview", .serialized)
struct TemplatePreviewTests {
    @Test("in-app and email as the member would get them, a draft, chat escaping, and the refusals; nothing written")
    func preview() async throws {
        try await withCatalogue { org, catalogue, client in
            func preview(_ json: String, type: UUID? = nil, token: String? = nil) async throws -> TestResponse {
                try await client.send(
                    .post, "/v1/notification-types/\((type ?? catalogue.isqCritical).lowercased)/preview", token: token ?? org.ownerToken,
                    json: json)
            }
            let payload = #""payload": {"isq": 25, "implant": "A&B", "threshold": 55}"#
            // In-app, as the member: the stored English template, values HTML-escaped (the bell's text).
            let inApp = try await preview(#"{"channel": "in_app", "user_id": "\#(org.memberID.lowercased)", \#(payload)}"#)
            #expect(inApp.status == .ok, "\(inApp.text)")
            #expect(inApp.json["subject"] as? String == "Critical ISQ 25")
            #expect(inApp.json["body"] as? String == "Implant A&amp;B: stability 25 is below 55.", "\(inApp.text)")
            let template = inApp.json["template"] as? [String: Any]
            #expect(
                template?["channel"] as? String == "in_app" && template?["locale"] as? String == "en"
                    && template?["draft"] as? Bool == false)
            #expect((inApp.json["recipient"] as? [String: Any])?["user_id"] as? String == org.memberID.lowercased)
            // Email in French: the type has no email template, so the in-app one in French, as text.
            let email = try await preview(#"{"channel": "email", "locale": "fr", \#(payload)}"#)
            #expect(email.json["subject"] as? String == "ISQ critique 25", "\(email.text)")
            #expect(email.json["body"] as? String == "Implant A&B : stabilité 25 sous 55.", "\(email.text)")
            #expect((email.json["template"] as? [String: Any])?["locale"] as? String == "fr")
            #expect((email.json["recipient"] as? [String: Any])?["display_name"] as? String == "Ada Lovelace")
            // A draft email with links: text unescaped, HTML escaped, placeholder links.
            let draft = try await preview(
                #"""
                {"channel": "email", \#(payload), "url": "https://clinic.example/implants/42",
                 "template": {"subject": "Hello {{{recipient.display_name}}}", "body": "{{payload.implant}} {{links.open}} {{links.unsubscribe}}", "html": "<p>{{payload.implant}}</p>"}}
                """#)
            #expect(draft.json["subject"] as? String == "Hello Ada Lovelace", "\(draft.text)")
            #expect(
                draft.json["body"] as? String
                    == "A&B https://herald.invalid/v1/links/preview https://herald.invalid/v1/unsubscribe/preview",
                "\(draft.text)")
            #expect(draft.json["html"] as? String == "<p>A&amp;B</p>", "\(draft.text)")
            #expect((draft.json["template"] as? [String: Any])?["draft"] as? Bool == true)
            // Chat: a Mattermost endpoint's values are Markdown-escaped, a Slack one's are not.
            let markdown = #""payload": {"isq": 25, "implant": "[x](https://evil.example)", "threshold": 55}"#
            let mattermost = try await preview(#"{"channel": "chat", "format": "mattermost", \#(markdown)}"#)
            let slack = try await preview(#"{"channel": "chat", \#(markdown)}"#)
            #expect((mattermost.json["body"] as? String ?? "").contains(#"\[x\]"#), "\(mattermost.text)")
            #expect((slack.json["body"] as? String ?? "").contains("[x](https://evil.example)"), "\(slack.text)")
            // Refusals: a broken draft, a user of nobody, another organisation's type, a member.
            let broken = try await preview(#"{"channel": "email", "template": {"body": "{{#open}} never closed"}}"#)
            #expect(
                broken.isProblem(.unprocessableContent) && (broken.json["detail"] as? String ?? "").hasPrefix("template.body"),
                "\(broken.text)")
            let nobody = try await preview(#"{"channel": "email", "user_id": "\#(UUID().uuidString)"}"#)
            #expect(
                nobody.isProblem(.unprocessableContent) && (nobody.json["detail"] as? String ?? "").contains("user_id"), "\(nobody.text)")
            let other = try await TestOrganisation.make()
            let foreign = try await preview(#"{"channel": "in_app"}"#, token: other.ownerToken)
            #expect(foreign.isProblem(.notFound), "\(foreign.text)")
            #expect(try await preview(#"{"channel": "in_app"}"#, token: org.memberToken).isProblem(.forbidden))
            // Nothing was written: no event, no feed row.
            let events = try await org.store { tx in try await tx.query("SELECT count(*)::int FROM events")[0].decode(Int.self) }
            #expect(events == 0)
        }
    }
}
