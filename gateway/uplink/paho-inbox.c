/* SPDX-License-Identifier: MIT */
/* paho's threads → the event loop (paho-inbox.h). */

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "paho-inbox.h"

struct gw_paho_inbox {
        pthread_mutex_t lock;
        struct gw_paho_item *head, *tail;
        int efd;
        sd_event_source *source;
        gw_paho_inbox_fn handler;
        void (*free_item)(struct gw_paho_item *item);
        void *ud;
};

static int on_ready(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct gw_paho_inbox *ib = userdata;
        uint64_t v;
        (void) !read(ib->efd, &v, sizeof v);
        pthread_mutex_lock(&ib->lock);
        struct gw_paho_item *it = ib->head;
        ib->head = ib->tail = NULL;
        pthread_mutex_unlock(&ib->lock);
        while (it) {
                struct gw_paho_item *next = it->next;
                ib->handler(ib->ud, it);
                ib->free_item(it);
                it = next;
        }
        return 0;
}

int gw_paho_inbox_new(sd_event *e, gw_paho_inbox_fn handler, void (*free_item)(struct gw_paho_item *item), void *ud,
                      struct gw_paho_inbox **ret) {
        struct gw_paho_inbox *ib;
        int r;
        if (!e || !handler || !free_item || !ret)
                return -EINVAL;
        ib = calloc(1, sizeof *ib);
        if (!ib)
                return -ENOMEM;
        pthread_mutex_init(&ib->lock, NULL);
        ib->handler = handler;
        ib->free_item = free_item;
        ib->ud = ud;
        ib->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (ib->efd < 0) {
                r = -errno;
                gw_paho_inbox_free(ib);
                return r;
        }
        r = sd_event_add_io(e, &ib->source, ib->efd, EPOLLIN, on_ready, ib);
        if (r < 0) {
                gw_paho_inbox_free(ib);
                return r;
        }
        *ret = ib;
        return 0;
}

void gw_paho_inbox_post(struct gw_paho_inbox *ib, struct gw_paho_item *item) {
        uint64_t one = 1;
        item->next = NULL;
        pthread_mutex_lock(&ib->lock);
        if (ib->tail)
                ib->tail->next = item;
        else
                ib->head = item;
        ib->tail = item;
        pthread_mutex_unlock(&ib->lock);
        (void) !write(ib->efd, &one, sizeof one);
}

struct gw_paho_inbox *gw_paho_inbox_free(struct gw_paho_inbox *ib) {
        if (!ib)
                return NULL;
        sd_event_source_disable_unref(ib->source);
        if (ib->efd >= 0)
                close(ib->efd);
        for (struct gw_paho_item *it = ib->head, *n; it; it = n) {
                n = it->next;
                ib->free_item(it);
        }
        pthread_mutex_destroy(&ib->lock);
        free(ib);
        return NULL;
}

/* ---- paho clients (paho-inbox.h) ------------------------------------------------------------- */

int gw_paho_client_new(const struct gw_paho_client_conf *c, MQTTAsync *ret) {
        MQTTAsync_createOptions co = MQTTAsync_createOptions_initializer;
        MQTTAsync client = NULL;
        co.sendWhileDisconnected = 0;
        co.maxBufferedMessages = c->max_buffered;
        co.MQTTVersion = c->mqtt_version;
        int r = MQTTAsync_createWithOptions(&client, c->uri, c->client_id, MQTTCLIENT_PERSISTENCE_NONE, NULL, &co);
        if (r != MQTTASYNC_SUCCESS)
                return r;
        r = MQTTAsync_setCallbacks(client, c->context, c->lost, c->arrived, NULL);
        if (r != MQTTASYNC_SUCCESS) {
                MQTTAsync_destroy(&client);
                return r;
        }
        *ret = client;
        return MQTTASYNC_SUCCESS;
}

int gw_paho_client_renew(const struct gw_paho_client_conf *c, MQTTAsync *client) {
        MQTTAsync fresh;
        int r = gw_paho_client_new(c, &fresh);
        if (r != MQTTASYNC_SUCCESS)
                return r;
        if (*client)
                MQTTAsync_destroy(client);
        *client = fresh;
        return MQTTASYNC_SUCCESS;
}
