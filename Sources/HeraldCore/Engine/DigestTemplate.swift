import Foundation

/// The digest email's template (issue 11): an organisation may set one per locale (Mustache,
/// `PUT /v1/digest-templates/{locale}`); without one, this built-in default renders it. The
/// recipient's locale picks it with the usual fallback (`TemplateRenderer.pick`).
///
/// What a digest template sees:
/// - `recipient.display_name`, `recipient.email`; `organisation.name`;
/// - `cadence` (`daily` or `weekly`), `count` (items), `count_text` (`1 notification`, `3 notifications`);
/// - `sections`: one per category in the order they first appear, each with `category` (its name)
///   and `items`, each with `title`, `body` (may be empty) and `link` (the tracked link, absent
///   when the event names no URL);
/// - `links.unsubscribe`: the one-click unsubscribe link of the digest.
///
/// `{{x}}` is HTML-escaped; the subject and the text part use `{{{x}}}`.
public enum DigestTemplate {
    public static let builtIn = TemplateContent(
        subject: "{{{organisation.name}}}: your {{cadence}} digest ({{count_text}})",
        body: """
            Hello {{{recipient.display_name}}},

            Here is what happened since your last {{cadence}} digest.
            {{#sections}}

            {{{category}}}
            {{#items}}
              - {{{title}}}
            {{#body}}
                {{{body}}}
            {{/body}}
            {{#link}}
                {{{link}}}
            {{/link}}
            {{/items}}
            {{/sections}}

            --
            {{{organisation.name}}}. Stop these emails: {{{links.unsubscribe}}}

            """,
        html: """
            <p>Hello {{recipient.display_name}},</p><p>Here is what happened since your last {{cadence}} digest.</p>\
            {{#sections}}<h2>{{category}}</h2><ul>{{#items}}<li><strong>{{#link}}<a href="{{link}}">{{title}}</a>{{/link}}\
            {{^link}}{{title}}{{/link}}</strong>{{#body}}<br>{{body}}{{/body}}</li>{{/items}}</ul>{{/sections}}\
            <hr><p>{{organisation.name}}. <a href="{{links.unsubscribe}}">Stop these emails</a></p>
            """)
}
